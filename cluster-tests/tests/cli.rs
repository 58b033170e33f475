//! The `hashgrid` CLI end to end against a node: the commands an admin types, their JSON
//! for scripts, and the errors they print.

use std::os::unix::ffi::OsStrExt;

use hashgrid_cluster_tests::{data, Node};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn backup_list_browse_restore_and_stats() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    data::edge_case_tree(&src);
    let s = src.to_str().unwrap();

    let first = node.cli_json(&["backup", s, "--client", "web01", "--tag", "nightly"]);
    let id = first["snapshot"].as_u64().unwrap();
    assert!(first["stats"]["files"].as_u64().unwrap() >= 10);
    let again = node.cli_json(&["backup", s, "--client", "web01"]);
    assert_eq!(again["parent"].as_u64(), Some(id));
    // No file is read or sent again; only tree objects of ancestors whose metadata moved
    // (other tests touch /tmp) may be new.
    assert!(
        again["stats"]["sent_bytes"].as_u64().unwrap() < 4096,
        "{again}"
    );
    assert_eq!(again["stats"]["reused_files"], again["stats"]["files"]);

    let list = node.cli_json(&["snapshots", "--client", "web01"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["tags"][0], "nightly");
    assert_eq!(list[0]["dataset"], "files");
    assert_eq!(list[0]["kind"], "files");

    let ls = node.cli(&["ls", &id.to_string(), &format!("{s}/dir"), "-l"]);
    assert!(ls.status.success(), "{}", stderr(&ls));
    let listing = String::from_utf8_lossy(&ls.stdout);
    assert!(listing.contains("/dir/random.bin"), "{listing}");
    assert!(listing.contains("-r--r--r--"), "{listing}");
    assert!(
        listing
            .lines()
            .any(|l| l.ends_with("/dir/deeper/still/deeper/file")),
        "{listing}"
    );
    assert!(
        !listing.contains("small.txt"),
        "ls PATH lists only that path: {listing}"
    );
    let ls = node.cli(&["ls", "latest", "--client", "web01"]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("link-abs"));

    let target = tmp.path().join("restore");
    let r = node.cli_json(&[
        "restore",
        "latest",
        &format!("{s}/small.txt"),
        "--client",
        "web01",
        "--target",
        target.to_str().unwrap(),
    ]);
    assert_eq!(r["summary"]["files"].as_u64(), Some(1));
    let restored = target.join(src.strip_prefix("/").unwrap());
    assert_eq!(
        std::fs::read(restored.join("small.txt")).unwrap(),
        b"hello\n"
    );

    let stats = node.cli_json(&["stats"]);
    assert_eq!(stats["snapshots"].as_u64(), Some(2));
    assert!(stats["stored_bytes"].as_u64().unwrap() > 0);
    assert!(stats["dedup_ratio"].as_f64().unwrap() > 1.5, "{stats}");
    assert_eq!(stats["clients"][0]["client"], "web01");

    let human = node.cli(&["stats"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("dedup"));
}

#[test]
fn errors_are_clear_and_nonzero() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));

    let out = node.cli(&["backup", "/no/such/path"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/no/such/path"), "{}", stderr(&out));

    let out = node.cli_with(&["snapshots"], |c| {
        c.arg("--token")
            .arg("wrong")
            .env("HASHGRID_TOKEN_FILE", "/nonexistent");
    });
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown token"), "{}", stderr(&out));

    let out = std::process::Command::new(hashgrid_cluster_tests::bin_dir().join("hashgrid"))
        .args([
            "--server",
            &node.server(),
            "--token-file",
            "/nonexistent/token",
            "snapshots",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("reading token file /nonexistent/token"),
        "{}",
        stderr(&out)
    );

    let out = node.cli(&[
        "restore",
        "12345",
        "--target",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("snapshot 12345 does not exist"),
        "{}",
        stderr(&out)
    );

    let out = node.cli(&[
        "backup",
        tmp.path().to_str().unwrap(),
        "--client",
        "bad name",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("client name"), "{}", stderr(&out));

    let out = node.cli(&["backup", "--image", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("neither a regular file nor a block device"),
        "{}",
        stderr(&out)
    );

    let out = node.cli(&["restore", "latest"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn non_utf8_names_survive_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::start(&tmp.path().join("node"));
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"caf\xe9-latin1");
    std::fs::write(src.join(odd), b"bytes").unwrap();
    let b = node.cli_json(&["backup", src.to_str().unwrap()]);
    let target = tmp.path().join("restore");
    node.cli_json(&[
        "restore",
        &b["snapshot"].to_string(),
        "--target",
        target.to_str().unwrap(),
    ]);
    let back = target.join(src.strip_prefix("/").unwrap()).join(odd);
    assert_eq!(std::fs::read(back).unwrap(), b"bytes");
}
