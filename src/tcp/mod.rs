//! TCP proxying: listeners, the pair state machine and the buffer pool it borrows from.

pub mod buffer;
pub mod listener;
pub mod pipe;
