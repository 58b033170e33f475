//! Joining: one node creates the cluster, four join through it; the catalog group keeps 3
//! voters, then 5, the rest learners; a commit sent through a learner is forwarded to the
//! leader and seen everywhere; when a voter is removed a learner takes its place.

use std::time::Duration;

use hashgrid_cluster_tests::cluster::{members_in, Cluster};
use hashgrid_cluster_tests::{backup_opts, bin_dir, runtime};
use hashgrid_proto::pb::{self, ChangeMemberRequest};

const SETTLE: Duration = Duration::from_secs(60);

fn voters_everywhere(n: usize) -> impl FnMut(&[pb::StatusResponse]) -> bool {
    move |all| {
        !all.is_empty()
            && all
                .iter()
                .all(|s| s.raft_voters.len() == n && s.raft_leader != 0)
    }
}

#[test]
fn members_join_voters_stay_at_target_and_learners_forward_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(tmp.path(), 3, 1, 1);
    runtime().block_on(async {
        cluster
            .wait_for("3 voters", SETTLE, voters_everywhere(3))
            .await;
        cluster
            .wait_for("3 active members", SETTLE, |all| {
                all.iter()
                    .all(|s| members_in(s, pb::MemberState::Active).len() == 3)
            })
            .await;
    });

    // A fourth member is a learner; a backup committed through it lands in the catalog.
    let learner = cluster.add_node();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("a.txt"), b"through a learner").unwrap();
    runtime().block_on(async {
        cluster
            .wait_for("4 members, 3 voters, 1 learner", SETTLE, |all| {
                all.len() == 4
                    && all
                        .iter()
                        .all(|s| s.raft_voters.len() == 3 && s.raft_learners.len() == 1)
            })
            .await;
        let learner_id = cluster.node_id(learner).await;
        let status = cluster.status(learner).await.unwrap();
        assert!(status.raft_learners.contains(&learner_id));
        assert_ne!(status.raft_leader, learner_id);

        let conn = cluster.connect(learner).await;
        let summary = hashgrid::backup::backup(&conn, &backup_opts(&[&data], false, "c", "d"))
            .await
            .expect("backup through a learner");
        for i in 0..4 {
            let conn = cluster.connect(i).await;
            let seen = async {
                loop {
                    if hashgrid::catalog::get(&conn, summary.snapshot)
                        .await
                        .is_ok()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            tokio::time::timeout(SETTLE, seen)
                .await
                .unwrap_or_else(|_| panic!("node {} never saw the snapshot", i + 1));
        }
    });

    // A fifth member makes 5 voters.
    cluster.add_node();
    runtime().block_on(async {
        cluster
            .wait_for("5 voters", SETTLE, voters_everywhere(5))
            .await;
    });

    // A sixth is a learner; removing a voter (not the leader) promotes it.
    let sixth = cluster.add_node();
    let removed = runtime().block_on(async {
        cluster
            .wait_for("5 voters and a learner", SETTLE, |all| {
                all.len() == 6 && all.iter().all(|s| s.raft_learners.len() == 1)
            })
            .await;
        let leader = cluster.leader().await.expect("a leader");
        let status = cluster.status(leader).await.unwrap();
        let victim = *status
            .raft_voters
            .iter()
            .find(|&&v| v != status.raft_leader)
            .unwrap();
        let sixth_id = cluster.node_id(sixth).await;
        let conn = cluster.connect(sixth).await;
        conn.admin
            .clone()
            .change_member(ChangeMemberRequest {
                node_id: victim,
                state: pb::MemberState::Removed as i32,
            })
            .await
            .expect("remove a voter");
        cluster
            .wait_for("the learner promoted", SETTLE, |all| {
                all.iter().filter(|s| s.node_id != victim).all(|s| {
                    s.raft_voters.len() == 5
                        && !s.raft_voters.contains(&victim)
                        && s.raft_voters.contains(&sixth_id)
                        && members_in(s, pb::MemberState::Removed) == vec![victim]
                })
            })
            .await;
        victim
    });

    // `cluster status` through the newest member shows the same cluster.
    let out = std::process::Command::new(bin_dir().join("hashgrid"))
        .args(["--json", "--server", &cluster.nodes[sixth].server()])
        .arg("--token-file")
        .arg(cluster.nodes[0].token_file())
        .args(["cluster", "status"])
        .output()
        .expect("run hashgrid");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let members = status["members"].as_array().expect("members");
    assert_eq!(members.len(), 6, "{status}");
    let state_of = |id: u64| {
        members
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["state"].as_str().unwrap().to_string())
    };
    assert_eq!(state_of(removed).as_deref(), Some("removed"), "{status}");
    let leaders: Vec<_> = members.iter().filter(|m| m["raft"] == "leader").collect();
    assert_eq!(leaders.len(), 1, "{status}");
    assert_eq!(leaders[0]["id"], status["leader"], "{status}");
    assert_eq!(
        members.iter().filter(|m| m["raft"] == "voter").count(),
        4,
        "{status}"
    );

    // Prometheus shows the same cluster: epoch, leader, members by state, worker states.
    let node = &cluster.nodes[sixth];
    let gauge = |name: &str, label: &str| node.metric_with(name, label).unwrap_or(-1.0);
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        // The gauges are set every half second: wait for the map and leader of the status.
        let epoch = gauge("hashgrid_cluster_epoch", "");
        let leader = gauge("hashgrid_cluster_leader", "");
        if epoch == status["epoch"].as_f64().unwrap()
            && leader == status["leader"].as_f64().unwrap()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics show epoch {epoch} and leader {leader}; {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(gauge("hashgrid_cluster_members", "state=\"active\""), 5.0);
    assert_eq!(gauge("hashgrid_cluster_members", "state=\"removed\""), 1.0);
    assert_eq!(gauge("hashgrid_cluster_members", "state=\"joining\""), 0.0);
    assert!(gauge("hashgrid_raft_term", "") >= 1.0);
    for worker in ["rebalance", "repair"] {
        // Exactly one state at a time.
        let label = format!("worker=\"{worker}\"");
        assert_eq!(gauge("hashgrid_worker_state", &label), 1.0, "{worker}");
    }

    // Node-to-node calls take the cluster secret, nothing else: not an agent's (even the
    // admin's) token, not a wrong secret.
    let file = data.join("a.txt");
    let known = hashgrid_proto::ChunkId::of(&std::fs::read(&file).unwrap());
    runtime().block_on(async {
        let ids = [known];
        let admin = cluster.nodes[0].token();
        for (secret, token, why) in [
            (None, Some(admin.as_str()), "the admin token"),
            (Some("00".repeat(32)), None, "a wrong secret"),
            (None, None, "no credential"),
        ] {
            let refused = node
                .owner_has(&ids, secret.as_deref(), token)
                .await
                .expect_err(why);
            assert_eq!(
                refused.code(),
                tonic::Code::Unauthenticated,
                "{why}: {refused}"
            );
        }
        let secret = cluster.nodes[0].secret();
        let held = node
            .owner_has(&ids, Some(&secret), None)
            .await
            .expect("with the secret");
        assert_eq!(held.len(), 1);
    });

    // `cluster nodes` lists every member with its state, the removed one too.
    let out = std::process::Command::new(bin_dir().join("hashgrid"))
        .args(["--server", &cluster.nodes[sixth].server()])
        .arg("--token-file")
        .arg(cluster.nodes[0].token_file())
        .args(["cluster", "nodes"])
        .output()
        .expect("run hashgrid");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(rows.len(), 6, "{text}");
    let row_of = |id: u64| {
        rows.iter()
            .find(|r| r.split_whitespace().next() == Some(&id.to_string()))
            .unwrap_or_else(|| panic!("no row for node {id}: {text}"))
    };
    assert!(row_of(removed).contains(" removed "), "{text}");
    for m in members.iter().filter(|m| m["id"] != removed) {
        let row = row_of(m["id"].as_u64().unwrap());
        assert!(row.contains(" active "), "{text}");
        assert!(row.contains(m["addr"].as_str().unwrap()), "{text}");
    }
}
