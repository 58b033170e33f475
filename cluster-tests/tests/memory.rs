//! Streaming: backing up an image much larger than the agent's memory budget keeps the
//! agent's peak memory bounded (chunks are read, sent and dropped, never held all at once).

use std::io::Write;
use std::time::Duration;

use hashgrid_cluster_tests::{bin_dir, data, Node};

/// Peak resident memory (VmHWM) of a running process, in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[test]
fn agent_memory_stays_bounded_on_a_large_image() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    // 3 GiB of incompressible data: over ten times the agent's 256 MiB upload budget.
    let img = tmp.path().join("big.raw");
    let mut f = std::fs::File::create(&img).unwrap();
    for i in 0..48u64 {
        f.write_all(&data::random_bytes(i, 64 << 20)).unwrap();
    }
    drop(f);
    let mut child = std::process::Command::new(bin_dir().join("hashgrid"))
        .args(["--server", &node.server(), "--json", "backup", "--image"])
        .arg(&img)
        .arg("--token-file")
        .arg(node.token_file())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        if let Some(p) = peak_rss(child.id()) {
            peak = peak.max(p);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["stats"]["logical_bytes"].as_u64(), Some(3 << 30));
    assert!(peak > 0, "could not read the agent's memory use");
    assert!(
        peak < 700 << 20,
        "agent peaked at {} MiB for a 3 GiB image",
        peak >> 20
    );
}
