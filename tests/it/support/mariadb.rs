//! A MariaDB server of the test's own: `mariadbd` (the machine's binary)
//! with a fresh data directory (`mariadb-install-db`), on a free port,
//! with binary logging for replication; stopped and removed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anteroom_testkit::free_port;

/// One running server.
pub struct MariaDb {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
}

fn mariadbd() -> PathBuf {
    ["/usr/sbin/mariadbd", "/usr/bin/mariadbd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("mariadbd"))
}

impl MariaDb {
    /// A fresh server with `server_id`, binary log and GTIDs, every change
    /// it applies as a replica logged too (`log_slave_updates`), so
    /// either server can be the other's primary.
    pub async fn start(name: &str, server_id: u32) -> Self {
        let port = free_port().unwrap();
        let dir = std::env::temp_dir().join(format!(
            "anteroom-mariadb-{name}-{}-{port}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("data");
        let install = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--user=root",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("mariadb-install-db (Debian's mariadb-server)");
        assert!(
            install.status.success(),
            "mariadb-install-db: {}",
            String::from_utf8_lossy(&install.stderr)
        );
        let socket = dir.join("mariadb.sock");
        let child = Command::new(mariadbd())
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", dir.join("mariadb.pid").display()))
            .arg(format!("--log-bin={}", dir.join("binlog").display()))
            .arg(format!("--port={port}"))
            .arg(format!("--server-id={server_id}"))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--log-slave-updates",
                "--binlog-format=ROW",
                "--innodb-buffer-pool-size=16M",
                "--user=root",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("error.log")).unwrap())
            .spawn()
            .expect("mariadbd");
        let server = Self {
            child,
            dir,
            socket,
            port,
        };
        super::wait_for_port(port).await;
        server
    }

    /// `HOST:PORT` of its TCP listener.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Runs `sql` as root over the server's socket; its rows,
    /// tab-separated. Panics when it fails.
    pub async fn sql(&self, sql: &str) -> String {
        match self.try_sql(sql).await {
            Ok(rows) => rows,
            Err(err) => panic!("{sql}: {err}"),
        }
    }

    /// [`sql`](Self::sql), its error returned.
    pub async fn try_sql(&self, sql: &str) -> Result<String, String> {
        let (socket, sql) = (self.socket.clone(), sql.to_owned());
        let out = tokio::task::spawn_blocking(move || {
            Command::new("mariadb")
                .arg("--no-defaults")
                .arg(format!("--socket={}", socket.display()))
                .args(["-uroot", "-N", "-B", "-e", &sql])
                .output()
                .expect("mariadb (Debian's mariadb-client)")
        })
        .await
        .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl MariaDb {
    /// The one number `sql` selects (0 when it is none).
    pub fn number(&self, sql: &str) -> impl std::future::Future<Output = u64> + '_ {
        let sql = sql.to_owned();
        async move { self.sql(&sql).await.trim().parse().unwrap_or(0) }
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
