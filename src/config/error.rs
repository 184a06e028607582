//! The config layer's one error type. Every error names `FILE:LINE:COL` and the cause,
//! so an operator can jump straight to the place in the file.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based; 0 when the error has no position (the file could not be read).
    pub line: u32,
    pub col: u32,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: &str, line: u32, col: u32, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_string(),
            line,
            col,
            message: message.into(),
        }
    }

    pub fn io(file: &str, err: &std::io::Error) -> ConfigError {
        ConfigError::new(
            file,
            0,
            0,
            format!("cannot read config: {}", crate::sys::io_reason(err)),
        )
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.col, self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}
