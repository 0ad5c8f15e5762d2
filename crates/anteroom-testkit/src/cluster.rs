//! A real Redis Cluster on loopback: three primaries and three replicas,
//! made by `redis-cli --cluster create`, stopped when dropped.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::LocalRedis;

/// Six cluster nodes (three primaries, three replicas) and their directories.
pub struct LocalCluster {
    /// The nodes, in the order they were started.
    pub nodes: Vec<LocalRedis>,
    /// Each node's directory, removed on drop.
    files: Vec<std::path::PathBuf>,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        for dir in &self.files {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl LocalCluster {
    /// Starts six nodes, creates the cluster and waits (at most 30 s) until
    /// every node says it is ok. Panics when it cannot: this is test support.
    pub fn start() -> Self {
        let mut files = Vec::new();
        let mut used = std::collections::HashSet::new();
        let mut nodes: Vec<LocalRedis> = Vec::new();
        while nodes.len() < 6 {
            let i = nodes.len();
            // A directory of its own: a replica writes the primary's data
            // there (dump.rdb), which must not leak into other nodes.
            let dir = std::env::temp_dir().join(format!(
                "anteroom-cluster-{}-{i}-{}",
                std::process::id(),
                crate::free_port().unwrap()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let conf = dir.join("nodes.conf");
            // The bus port is chosen too: the default, port + 10000, may be
            // another node's port.
            let bus = crate::free_port().unwrap();
            if !used.insert(bus) {
                continue;
            }
            let node = LocalRedis::start_with_args(&[
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus.to_string(),
                "--dir",
                dir.to_str().unwrap(),
                "--cluster-config-file",
                conf.to_str().unwrap(),
                "--cluster-node-timeout",
                "1000",
                // Replicas sync at once (the default waits 5 s for more).
                "--repl-diskless-sync-delay",
                "0",
            ])
            .expect("start a cluster node");
            files.push(dir);
            // A port handed out twice would make two "nodes" of one server.
            if used.insert(node.port()) {
                nodes.push(node);
            }
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(out.status.success(), "cluster create failed: {out:?}");
        let cluster = Self { nodes, files };
        let started = Instant::now();
        while !cluster.all_ok() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the cluster did not become ok within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    /// Every node says the cluster is ok, and every replica has synced
    /// (a replica that never synced cannot take over).
    fn all_ok(&self) -> bool {
        let ask = |port: u16, args: &[&str]| {
            Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        self.nodes.iter().all(|n| {
            let replication = ask(n.port(), &["info", "replication"]);
            ask(n.port(), &["cluster", "info"]).contains("cluster_state:ok")
                && (replication.contains("role:master")
                    || replication.contains("master_link_status:up"))
        })
    }

    /// `redis+cluster://` naming the first three nodes as seeds.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes[..3]
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// The node that is primary for `slot` now.
    pub fn primary_for(&self, slot: u16) -> usize {
        for (i, node) in self.nodes.iter().enumerate() {
            let out = Command::new("redis-cli")
                .args(["-p", &node.port().to_string(), "cluster", "nodes"])
                .output()
                .expect("redis-cli cluster nodes");
            let text = String::from_utf8_lossy(&out.stdout);
            for line in text
                .lines()
                .filter(|l| l.contains("myself") && l.contains("master"))
            {
                for range in line.split_whitespace().skip(8) {
                    let (start, end) = range.split_once('-').unwrap_or((range, range));
                    if let (Ok(start), Ok(end)) = (start.parse::<u16>(), end.parse::<u16>()) {
                        if (start..=end).contains(&slot) {
                            return i;
                        }
                    }
                }
            }
        }
        panic!("no primary serves slot {slot}");
    }
}

/// Queue names whose slots fall on three different primaries of a cluster
/// made by `redis-cli --cluster create` (slots split in thirds).
pub fn queues_on_three_shards() -> [String; 3] {
    let mut found: [Option<String>; 3] = [None, None, None];
    for n in 0.. {
        let name = format!("shard-q{n}");
        let third = usize::from(anteroom_redis::key_slot(name.as_bytes()) / 5462).min(2);
        found[third].get_or_insert(name);
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    found.map(Option::unwrap)
}
