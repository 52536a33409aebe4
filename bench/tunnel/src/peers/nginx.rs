//! The nginx `stream` pair: one nginx with one worker holds both tunnel ends. Server A
//! listens plain and proxies with `proxy_ssl` (client certificate, server verified) to
//! server B, which terminates TLS 1.3 with `ssl_verify_client on` and proxies to the backend.
//! CPU is counted for the master and its worker.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{Contender, Kind};
use crate::procs::{ChildGuard, find_program, free_port};
use meshup_tests::tls::{Pki, SERVER_NAME};

/// Starts nginx in `dir` and returns the contender once the plain end listens.
pub fn start(dir: &Path, pki: &Pki, backend: SocketAddr) -> Result<Contender> {
    let program = find_program(&["nginx"], "nginx")?;
    let load_module = stream_module_directive(&program)?;
    let front_port = free_port()?;
    let back_port = free_port()?;
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).context("create nginx prefix")?;

    // No access log in the stream block (none is configured), error log at `warn`: a tuned
    // deployment does not log every connection either.
    let conf = format!(
        "{load_module}\
         worker_processes 1;\n\
         pid {prefix}/nginx.pid;\n\
         error_log {prefix}/logs/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         stream {{\n\
           server {{\n\
             listen 127.0.0.1:{front_port};\n\
             proxy_pass 127.0.0.1:{back_port};\n\
             proxy_ssl on;\n\
             proxy_ssl_protocols TLSv1.3;\n\
             proxy_ssl_certificate {client_cert};\n\
             proxy_ssl_certificate_key {client_key};\n\
             proxy_ssl_trusted_certificate {ca};\n\
             proxy_ssl_verify on;\n\
             proxy_ssl_name {SERVER_NAME};\n\
             proxy_ssl_session_reuse on;\n\
           }}\n\
           server {{\n\
             listen 127.0.0.1:{back_port} ssl;\n\
             ssl_protocols TLSv1.3;\n\
             ssl_certificate {server_cert};\n\
             ssl_certificate_key {server_key};\n\
             ssl_verify_client on;\n\
             ssl_client_certificate {ca};\n\
             proxy_pass {backend};\n\
           }}\n\
         }}\n",
        prefix = prefix.display(),
        client_cert = pki.client_cert.display(),
        client_key = pki.client_key.display(),
        ca = pki.ca.display(),
        server_cert = pki.server_cert.display(),
        server_key = pki.server_key.display(),
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).context("write nginx config")?;

    let mut cmd = Command::new(&program);
    cmd.arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path)
        // -e: the compiled-in error log (/var/log/nginx) must not be touched before the
        // config is read.
        .arg("-e")
        .arg(prefix.join("logs/error.log"))
        .args(["-g", "daemon off;"]);
    let mut nginx = ChildGuard::spawn("nginx", cmd, &dir.join("nginx.log"))?;
    nginx.wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], back_port)),
        Duration::from_secs(10),
    )?;
    let front = SocketAddr::from(([127, 0, 0, 1], front_port));
    nginx.wait_for_port(front, Duration::from_secs(10))?;
    Ok(Contender::with_processes(
        "nginx",
        Kind::Peer,
        front,
        vec![nginx],
        Vec::new(),
    ))
}

/// The `load_module` line if this nginx builds `stream` as a dynamic module (Debian does,
/// shipping it in libnginx-mod-stream), or nothing if it is built in.
fn stream_module_directive(program: &Path) -> Result<String> {
    let out = Command::new(program)
        .arg("-V")
        .output()
        .with_context(|| format!("run {} -V", program.display()))?;
    // nginx prints its build options on stderr.
    let build =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if !build.contains("--with-stream") {
        bail!(
            "this nginx is built without the stream module; install Debian's `nginx` with `libnginx-mod-stream`"
        );
    }
    if !build.contains("--with-stream=dynamic") {
        return Ok(String::new());
    }
    let modules_dir = build
        .split_whitespace()
        .find_map(|opt| opt.strip_prefix("--modules-path="))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/nginx/modules"));
    let module = modules_dir.join("ngx_stream_module.so");
    if !module.is_file() {
        bail!(
            "nginx builds `stream` as a module but {} is missing: install the Debian package `libnginx-mod-stream`",
            module.display()
        );
    }
    Ok(format!("load_module {};\n", module.display()))
}
