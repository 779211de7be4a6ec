//! A PostgreSQL server of the test's own, in a temporary directory, that the test may stop,
//! start and restart (the shared server other tests use must never be): `initdb` and `pg_ctl`
//! from the newest `/usr/lib/postgresql/<version>/bin`, a free port on 127.0.0.1, its socket in
//! the directory. Run as the `postgres` user when the test runs as root (initdb refuses root).
//! Missing tools fail the test loudly: it was asked for.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
}

/// The newest installed server's `bin` directory.
fn server_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .unwrap_or_else(|e| {
            panic!("{} cannot be read ({e}): this test needs a PostgreSQL server installed (initdb, pg_ctl); install postgresql", root.display())
        })
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .unwrap_or_else(|| {
            panic!("no initdb and pg_ctl under {}/<version>/bin: this test needs a PostgreSQL server installed; install postgresql", root.display())
        })
        .1
}

fn running_as_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id -u runs");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PrivatePostgres {
    /// Creates the cluster and starts the server (fsync off: nothing here must survive a
    /// crash of the machine).
    pub fn start() -> PrivatePostgres {
        let bin = server_bin();
        let dir = tempfile::tempdir().unwrap();
        let as_postgres = running_as_root();
        let data = dir.path().join("data");
        let server = PrivatePostgres {
            bin,
            data,
            port: free_port(),
            as_postgres,
            dir,
        };
        if as_postgres {
            // The server's user must reach the directory and own what it writes.
            let status = Command::new("chmod")
                .args(["0755", server.dir.path().to_str().unwrap()])
                .status()
                .unwrap();
            assert!(status.success(), "chmod of the server's directory");
            std::fs::create_dir(&server.data).unwrap();
            std::fs::create_dir(server.socket_dir()).unwrap();
            let status = Command::new("chown")
                .args([
                    "-R",
                    "postgres:postgres",
                    server.data.to_str().unwrap(),
                    server.socket_dir().to_str().unwrap(),
                ])
                .status()
                .unwrap();
            assert!(
                status.success(),
                "chown of the server's directory to postgres"
            );
        } else {
            std::fs::create_dir(server.socket_dir()).unwrap();
        }
        server.tool(
            "initdb",
            &[
                "-D",
                server.data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        );
        server.pg_ctl_start();
        server
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("socket")
    }

    /// Beside the socket, in a directory the server's user owns.
    fn log(&self) -> PathBuf {
        self.socket_dir().join("server.log")
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs a server tool, as `postgres` when needed; fails the test with its output.
    fn tool(&self, name: &str, args: &[&str]) -> Output {
        let program = self.bin.join(name);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("{} cannot run: {e}", program.display()));
        assert!(
            out.status.success(),
            "{name} {args:?} failed: {}{}\nserver log: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.log()).unwrap_or_default()
        );
        out
    }

    fn pg_ctl_start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.socket_dir().display()
        );
        self.tool(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-o",
                &options,
                "-l",
                self.log().to_str().unwrap(),
                "-w",
                "start",
            ],
        );
    }

    /// `pg_ctl restart -m fast`: every session ended, the server back once it accepts
    /// connections.
    pub fn restart_fast(&self) {
        // `restart` starts the server with the options it ran with (`postmaster.opts`); the
        // log file is named again, or the server would write to this process's pipes.
        self.tool(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-l",
                self.log().to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "restart",
            ],
        );
    }

    /// `pg_ctl stop -m fast`.
    pub fn stop_fast(&self) {
        self.tool(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    /// Starts the server again after [`PrivatePostgres::stop_fast`], on the same port.
    pub fn start_again(&self) {
        self.pg_ctl_start();
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let program = self.bin.join("pg_ctl");
        let data = self.data.to_str().unwrap().to_string();
        let args = ["-D", data.as_str(), "-m", "immediate", "-w", "stop"];
        let _ = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .output()
        } else {
            Command::new(&program).args(args).output()
        };
    }
}
