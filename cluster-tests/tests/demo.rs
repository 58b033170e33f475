//! The README's first command: `hashgrid demo` runs the whole job and verifies itself.

use hashgrid_cluster_tests::bin_dir;

#[test]
fn demo_runs_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin_dir().join("hashgrid"))
        .args(["demo", "--size-mib", "24", "--dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.matches("identical to the source").count(),
        2,
        "{stdout}"
    );
    assert!(stdout.contains("dedup + compression"), "{stdout}");
}
