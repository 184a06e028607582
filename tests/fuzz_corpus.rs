//! Replays every file of every fuzz target's corpus (`fuzz/corpus/<target>/`) through the
//! target's entry point in `sluice::fuzzing`, on stable, so that an input that once crashed a
//! parser (saved there by `make fuzz`) keeps being tried by `make test`.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut count = 0;
    for entry in entries {
        let path = entry.expect("entry").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        run(&data);
        count += 1;
    }
    assert!(count > 0, "the {target} corpus is empty");
}

#[test]
fn admin_http_corpus() {
    replay("admin_http", sluice::fuzzing::admin_http);
}

#[test]
fn config_corpus() {
    replay("config", sluice::fuzzing::config);
}

#[test]
fn cidr_corpus() {
    replay("cidr", sluice::fuzzing::cidr);
}

#[test]
fn proxy_protocol_corpus() {
    replay("proxy_protocol", sluice::fuzzing::proxy_protocol);
}

#[test]
fn sni_corpus() {
    replay("sni", sluice::fuzzing::sni);
}

#[test]
fn dns_corpus() {
    replay("dns", sluice::fuzzing::dns);
}
