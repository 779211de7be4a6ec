//! `cargo xtask deb`: lays out the package tree under target/debian/ and builds the .deb with
//! `dpkg-deb --root-owner-group --build` (every file root:root; the maintainer scripts set the
//! group of the config once the system group exists). What goes where is the table in
//! docs/OPERATIONS.md ("Install from the Debian package").

use anyhow::{Context, bail, ensure};
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const PACKAGE: &str = "b24eventd";

#[derive(Debug)]
pub struct Options {
    pub version: Option<String>,
    pub build: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            version: None,
            build: true,
        }
    }
}

/// Builds the package; returns the path of the .deb.
pub fn build(root: &Path, options: &Options) -> anyhow::Result<PathBuf> {
    let cmd = b24eventd::cli::command();
    // "0.1.0 (journal schema 6)": the package version is the crate's.
    let crate_version = cmd
        .get_version()
        .and_then(|v| v.split_whitespace().next())
        .context("b24eventd's command has no version")?
        .to_string();
    let version = options.version.clone().unwrap_or(crate_version);
    ensure!(
        !version.is_empty()
            && version.starts_with(|c: char| c.is_ascii_digit())
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".+~-".contains(c)),
        "--version {version:?} is not a Debian version (digits first, then [A-Za-z0-9.+~-])"
    );
    let arch = output(Command::new("dpkg").arg("--print-architecture")).context(
        "dpkg --print-architecture (the package is built with dpkg's dpkg-deb: build on Debian or Ubuntu)",
    )?;

    let target = target_dir(root)?;
    if options.build {
        let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        // `cargo run` gave this process xtask's CARGO_MANIFEST_DIR and CARGO_PKG_*; ring's
        // build script tracks CARGO_MANIFEST_DIR, so passing them on would rebuild half the
        // dependency tree on every run.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_MANIFEST_")
                || [
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                ]
                .contains(&key.as_ref())
            {
                cargo.env_remove(key.as_ref());
            }
        }
        let status = cargo
            .current_dir(root)
            .args(["build", "--release", "-p", PACKAGE, "--bin", PACKAGE])
            .status()
            .context("cargo build")?;
        ensure!(
            status.success(),
            "cargo build --release -p {PACKAGE} failed"
        );
    }
    let binary = target.join("release").join(PACKAGE);
    ensure!(
        binary.is_file(),
        "{} is missing: run without --no-build",
        binary.display()
    );

    let out = target.join("debian");
    let name = format!("{PACKAGE}_{version}_{arch}");
    let tree = out.join(&name);
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }

    // The program, the helper that stores the first tokens as the service, the unit.
    install(&tree, "usr/bin/b24eventd", &fs::read(&binary)?, 0o755)?;
    install(
        &tree,
        "usr/sbin/b24eventd-as-service",
        &read(root, "packaging/deb/b24eventd-as-service")?,
        0o755,
    )?;
    let unit = packaged_unit(&String::from_utf8(read(
        root,
        "systemd/b24eventd.service",
    )?)?)?;
    install(
        &tree,
        "lib/systemd/system/b24eventd.service",
        unit.as_bytes(),
        0o644,
    )?;
    // 0640 here and root:b24eventd from postinst: the file may hold client secrets.
    install(
        &tree,
        "etc/b24eventd/config.toml",
        &read(root, "config.example.toml")?,
        0o640,
    )?;

    // Man pages and completions, from the clap definitions.
    let man = tree.join("usr/share/man/man1");
    fs::create_dir_all(&man)?;
    clap_mangen::generate_to(cmd.clone(), &man).context("generating the man pages")?;
    let man8 = tree.join("usr/share/man/man8");
    fs::create_dir_all(&man8)?;
    clap_mangen::Man::new(helper_command())
        .section("8")
        .generate_to(&man8)
        .context("generating b24eventd-as-service.8")?;
    gzip(&man8.join("b24eventd-as-service.8"))?;
    let mut pages = 1;
    for entry in fs::read_dir(&man)? {
        let path = entry?.path();
        gzip(&path)?;
        pages += 1;
    }
    let completions = tree.join("completions.tmp");
    fs::create_dir_all(&completions)?;
    for (shell, dest) in [
        (
            clap_complete::Shell::Bash,
            "usr/share/bash-completion/completions/b24eventd",
        ),
        (
            clap_complete::Shell::Zsh,
            "usr/share/zsh/vendor-completions/_b24eventd",
        ),
        (
            clap_complete::Shell::Fish,
            "usr/share/fish/vendor_completions.d/b24eventd.fish",
        ),
    ] {
        let mut cmd = cmd.clone();
        let file = clap_complete::generate_to(shell, &mut cmd, PACKAGE, &completions)
            .with_context(|| format!("generating the {shell} completion"))?;
        install(&tree, dest, &fs::read(&file)?, 0o644)?;
    }
    fs::remove_dir_all(&completions)?;

    // Docs.
    let doc = "usr/share/doc/b24eventd";
    for (from, to) in [
        ("README.md", "README.md"),
        ("docs/OPERATIONS.md", "OPERATIONS.md"),
        ("ARCHITECTURE.md", "ARCHITECTURE.md"),
        ("config.example.toml", "examples/config.example.toml"),
    ] {
        install(&tree, &format!("{doc}/{to}"), &read(root, from)?, 0o644)?;
        if to.ends_with(".md") {
            gzip(&tree.join(doc).join(to))?;
        }
    }
    install(
        &tree,
        &format!("{doc}/copyright"),
        COPYRIGHT.as_bytes(),
        0o644,
    )?;

    // Control area.
    for script in ["postinst", "prerm", "postrm"] {
        install(
            &tree,
            &format!("DEBIAN/{script}"),
            &read(root, &format!("packaging/deb/{script}"))?,
            0o755,
        )?;
    }
    install(
        &tree,
        "DEBIAN/conffiles",
        b"/etc/b24eventd/config.toml\n",
        0o644,
    )?;
    let control = control(&version, &arch, &binary, installed_size(&tree)?)?;
    install(&tree, "DEBIAN/control", control.as_bytes(), 0o644)?;
    install(&tree, "DEBIAN/md5sums", md5sums(&tree)?.as_bytes(), 0o644)?;

    let deb = out.join(format!("{name}.deb"));
    let status = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&tree)
        .arg(&deb)
        .status()
        .context("dpkg-deb (Debian's dpkg package)")?;
    ensure!(status.success(), "dpkg-deb --build failed");
    eprintln!(
        "{}: {} bytes, {pages} man pages",
        deb.display(),
        fs::metadata(&deb)?.len()
    );
    Ok(deb)
}

/// The repository's unit as the package installs it: the binary in /usr/bin, and the static
/// `b24eventd` user instead of `DynamicUser=yes`. With DynamicUser=, StateDirectory= lives below
/// /var/lib/private/ (mode 0700, root), which only the running unit can reach ("If DynamicUser=
/// is used, the logic for ... StateDirectory= is slightly altered", systemd.exec(5),
/// https://www.freedesktop.org/software/systemd/man/latest/systemd.exec.html#RuntimeDirectory=);
/// a static user lets `b24eventd-as-service` store the first tokens in the journal as the service.
/// What DynamicUser= implies (RemoveIPC=, PrivateTmp=, NoNewPrivileges=, RestrictSUIDSGID=,
/// ProtectSystem=strict) is kept: the unit sets all but RemoveIPC=, added here.
fn packaged_unit(unit: &str) -> anyhow::Result<String> {
    let body = unit
        .find("[Unit]")
        .map(|at| &unit[at..])
        .context("systemd/b24eventd.service has no [Unit] section")?;
    ensure!(
        body.contains("/usr/local/bin/b24eventd"),
        "systemd/b24eventd.service no longer names /usr/local/bin/b24eventd: update packaged_unit"
    );
    ensure!(
        body.lines().filter(|l| *l == "DynamicUser=yes").count() == 1,
        "systemd/b24eventd.service no longer has one DynamicUser=yes line: update packaged_unit"
    );
    let body = body.replace("/usr/local/bin/b24eventd", "/usr/bin/b24eventd").replace(
        "DynamicUser=yes\n",
        "# The package's system user (postinst makes it), so that `b24eventd-as-service` can write the\n\
         # journal as the service does. RemoveIPC= is what DynamicUser=yes implied beyond the rest.\n\
         User=b24eventd\nGroup=b24eventd\nRemoveIPC=yes\n",
    );
    Ok(format!(
        "# b24eventd as a systemd service, installed by the b24eventd package. Before the first start:\n\
         # edit /etc/b24eventd/config.toml, put each portal's client secret in\n\
         # /etc/b24eventd/<portal>.secret (mode 0600, root; add a LoadCredential= line per portal\n\
         # with `systemctl edit b24eventd`), store the first tokens with\n\
         # `b24eventd-as-service auth login --portal main`, then: systemctl enable --now b24eventd\n\
         # Change this unit with `systemctl edit b24eventd` (a drop-in an upgrade keeps).\n{body}"
    ))
}

/// Depends: glibc at least the version the binary links against, adduser for postinst, and
/// ca-certificates: HTTPS portals and sinks verify against the system's roots (rustls-native-certs
/// reads /etc/ssl/certs; without it every HTTPS client fails to build).
/// The command line of packaging/deb/b24eventd-as-service (a shell script), for its man page.
fn helper_command() -> clap::Command {
    clap::Command::new("b24eventd-as-service")
        .about("Run a b24eventd command as the installed service runs (its user, journal and credentials)")
        .long_about(
            "Runs `/usr/bin/b24eventd --config /etc/b24eventd/config.toml COMMAND ...` as the \
             service user b24eventd, with umask 077, STATE_DIRECTORY=/var/lib/b24eventd (the \
             unit's StateDirectory=, so the journal is /var/lib/b24eventd/journal.db unless \
             [journal] path says otherwise) and a CREDENTIALS_DIRECTORY holding the files the \
             unit's LoadCredential= lines name (the unit and its drop-ins), copied to a private \
             directory under /run and removed afterwards. Run it as root. Use it to store the \
             first tokens in the service's own journal before the first start \
             (`b24eventd-as-service auth login --portal main`), and for doctor, subscribe and \
             the journal commands. It makes /var/lib/b24eventd when missing, and hands it to the \
             b24eventd user when another owns it, as the unit does at start.",
        )
        .arg(
            clap::Arg::new("command")
                .value_name("COMMAND")
                .num_args(1..)
                .trailing_var_arg(true)
                .required(true)
                .help("A b24eventd command and its arguments, e.g. `auth login --portal main`"),
        )
        .after_help("See also: b24eventd(1), b24eventd-auth-login(1), systemd.exec(5).")
}

fn control(version: &str, arch: &str, binary: &Path, size_kib: u64) -> anyhow::Result<String> {
    let libc = match glibc_floor(binary)? {
        Some(v) => format!("libc6 (>= {v})"),
        None => "libc6".to_string(),
    };
    let maintainer = match (std::env::var("DEBFULLNAME"), std::env::var("DEBEMAIL")) {
        (Ok(name), Ok(email)) => format!("{name} <{email}>"),
        _ => "b24eventd maintainers <root@localhost>".to_string(),
    };
    Ok(format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {maintainer}\n\
         Installed-Size: {size_kib}\n\
         Depends: {libc}, adduser, ca-certificates\n\
         Section: net\n\
         Priority: optional\n\
         Homepage: https://github.com/b24eventd/b24eventd\n\
         Description: Bitrix24 offline events to local sinks, journaled in SQLite\n \
         b24eventd pulls a Bitrix24 portal's offline events (event.offline.get), records\n \
         each batch in a local SQLite journal first, delivers every event to the configured\n \
         sinks (HTTP, file, exec, PostgreSQL, Redis, AMQP, MQTT, NATS) and only then settles\n \
         it upstream. Nothing is lost on a crash, an outage or an expired token.\n \
         .\n \
         The service is installed but neither enabled nor started: edit\n \
         /etc/b24eventd/config.toml, store the first tokens with b24eventd-as-service, then\n \
         systemctl enable --now b24eventd.\n"
    ))
}

/// The highest GLIBC_x.y symbol version the binary needs, from `objdump -T` (binutils), so
/// the package does not install where the binary cannot run. None when objdump is missing.
fn glibc_floor(binary: &Path) -> anyhow::Result<Option<String>> {
    let Ok(out) = Command::new("objdump").arg("-T").arg(binary).output() else {
        eprintln!("objdump (binutils) missing: Depends: libc6 without a version");
        return Ok(None);
    };
    ensure!(
        out.status.success(),
        "objdump -T {} failed",
        binary.display()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let best = text
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let parts: Option<Vec<u32>> = v.split('.').map(|p| p.parse().ok()).collect();
            parts.map(|p| (p, v.to_string()))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, v)| v);
    Ok(best)
}

fn installed_size(tree: &Path) -> anyhow::Result<u64> {
    let mut bytes = 0;
    for file in files(tree)? {
        bytes += fs::metadata(&file)?.len();
    }
    Ok(bytes.div_ceil(1024))
}

/// md5sums of every file outside DEBIAN/, as dpkg --verify reads them.
fn md5sums(tree: &Path) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut files = files(tree)?;
    files.sort();
    for file in files {
        let rel = file.strip_prefix(tree)?;
        if rel.starts_with("DEBIAN") {
            continue;
        }
        let digest = md5::compute(fs::read(&file)?);
        out.push_str(&format!("{digest:x}  {}\n", rel.display()));
    }
    Ok(out)
}

fn files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.extend(files(&entry.path())?);
        } else {
            out.push(entry.path());
        }
    }
    Ok(out)
}

fn install(tree: &Path, rel: &str, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let path = tree.join(rel);
    let dir = path.parent().context("a path with a directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut file =
        fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// `gzip -9n`: compressed as Debian ships man pages and docs (-n: no name or time stamp inside,
/// so the same tree gives the same bytes).
fn gzip(path: &Path) -> anyhow::Result<()> {
    let status = Command::new("gzip")
        .args(["-9nf"])
        .arg(path)
        .status()
        .context("gzip")?;
    ensure!(status.success(), "gzip {} failed", path.display());
    Ok(())
}

fn read(root: &Path, rel: &str) -> anyhow::Result<Vec<u8>> {
    fs::read(root.join(rel)).with_context(|| format!("reading {rel}"))
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{:?} failed", cmd);
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// Cargo's target directory (CARGO_TARGET_DIR or a config's target-dir included), from
/// `cargo metadata`.
fn target_dir(root: &Path) -> anyhow::Result<PathBuf> {
    let text = output(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(root)
            .args(["metadata", "--format-version", "1", "--no-deps"]),
    )
    .context("cargo metadata")?;
    let meta: serde_json::Value = serde_json::from_str(&text)?;
    let dir = meta["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// debian/copyright in the machine-readable format
/// (https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/).
const COPYRIGHT: &str = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: b24eventd
Source: https://github.com/b24eventd/b24eventd

Files: *
Copyright: the b24eventd authors
License: MIT or Apache-2.0
 b24eventd is dual-licensed under the MIT license and the Apache License,
 Version 2.0; you may use it under either. Rust crates linked into the binary
 carry their own licenses (MIT, Apache-2.0, ISC, BSD and similar permissive
 terms; `cargo tree` in the source lists them).
 .
 On Debian systems the full text of the Apache License, Version 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
 .
 MIT license: Permission is hereby granted, free of charge, to any person
 obtaining a copy of this software and associated documentation files (the
 \"Software\"), to deal in the Software without restriction, including without
 limitation the rights to use, copy, modify, merge, publish, distribute,
 sublicense, and/or sell copies of the Software, and to permit persons to whom
 the Software is furnished to do so, subject to the following conditions:
 The above copyright notice and this permission notice shall be included in all
 copies or substantial portions of the Software.
 THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
 LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
 SOFTWARE.
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_unit_runs_the_packaged_binary_as_the_static_user() {
        let repo = workspace_unit();
        let unit = packaged_unit(&repo).unwrap();
        assert!(!unit.contains("/usr/local/bin"), "{unit}");
        assert!(
            !unit.lines().any(|l| l.starts_with("DynamicUser=")),
            "{unit}"
        );
        assert!(
            unit.contains(
                "\nExecStart=/usr/bin/b24eventd --config /etc/b24eventd/config.toml run\n"
            )
        );
        assert!(unit.contains("\nUser=b24eventd\nGroup=b24eventd\nRemoveIPC=yes\n"));
        // The sandbox and the credential stay as the repository's unit has them.
        for line in [
            "StateDirectory=b24eventd",
            "ProtectSystem=strict",
            "PrivateUsers=yes",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line}");
        }
        assert!(
            unit.lines()
                .any(|l| l == "LoadCredential=main.client_secret:/etc/b24eventd/main.secret")
        );
        assert!(
            unit.starts_with(
                "# b24eventd as a systemd service, installed by the b24eventd package."
            )
        );
    }

    #[test]
    fn a_unit_the_transform_no_longer_fits_is_refused() {
        let repo = workspace_unit();
        assert!(packaged_unit(&repo.replace("DynamicUser=yes\n", "")).is_err());
        assert!(packaged_unit(&repo.replace("/usr/local/bin/", "/opt/")).is_err());
    }

    fn workspace_unit() -> String {
        fs::read_to_string(crate::workspace_root().join("systemd/b24eventd.service")).unwrap()
    }
}
