//! Repository tasks, run as `cargo xtask TASK` (the alias is in .cargo/config.toml). One task:
//! `deb`, the Debian package, built with `dpkg-deb` from files this task lays out: the release
//! binary, the repository's systemd unit with the packaged paths and user, the example config as a
//! conffile, man pages and shell completions generated from the clap definitions, the docs, and
//! the maintainer scripts in packaging/deb/.

mod deb;

use anyhow::{Context, bail};
use std::path::PathBuf;

const USAGE: &str = "usage: cargo xtask deb [--version VERSION] [--no-build]

  deb          build target/debian/b24eventd_<version>_<arch>.deb
  --version    the package version (default: b24eventd's version in Cargo.toml); the
               install test builds an older one with it to test an upgrade
  --no-build   package the release binary already built instead of running
               `cargo build --release -p b24eventd` first";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next();
    match task.as_deref() {
        Some("deb") => {
            let mut options = deb::Options::default();
            while let Some(arg) = args.next() {
                match arg.as_str() {
                    "--version" => {
                        options.version = Some(args.next().context("--version needs a value")?)
                    }
                    "--no-build" => options.build = false,
                    "-h" | "--help" => {
                        println!("{USAGE}");
                        return Ok(());
                    }
                    other => bail!("unknown argument {other:?}\n{USAGE}"),
                }
            }
            let deb = deb::build(&workspace_root(), &options)?;
            println!("{}", deb.display());
            Ok(())
        }
        Some("-h" | "--help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown task {other:?}\n{USAGE}"),
    }
}

/// The repository: this crate lives in crates/xtask.
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/xtask sits two levels below the workspace root")
        .to_path_buf()
}
