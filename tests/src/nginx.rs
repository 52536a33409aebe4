//! nginx peers for the benchmarks: the Debian package's binary, one worker, a private prefix
//! directory, either a `stream` block (with its dynamic module: the tunnel pairs) or an
//! `http` block (the HTTP reverse-proxy pair), and the mTLS halves of a pair: the client
//! side (`proxy_ssl_*` with a client certificate, server verified) and the server side
//! (TLS 1.3, `ssl_verify_client on`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::procs::{ChildGuard, find_program};
use crate::tls::{Pki, SERVER_NAME};

/// The nginx binary (Debian package `nginx`).
pub fn program() -> Result<PathBuf> {
    find_program(&["nginx"], "nginx")
}

/// Starts one nginx (one worker, no daemon) whose `stream` block is `stream`, in its own
/// prefix `dir/<name>`, and waits until it listens on every address of `listens`.
pub fn start(dir: &Path, name: &str, stream: &str, listens: &[SocketAddr]) -> Result<ChildGuard> {
    let load_module = stream_module_directive(&program()?)?;
    let stream = format!("stream {{\n{stream}}}\n");
    start_with(dir, name, &load_module, &stream, listens)
}

/// Starts one nginx (one worker, no daemon) whose `http` block holds `servers` (and any
/// other `http`-level directives), in its own prefix `dir/<name>`, and waits until it
/// listens on every address of `listens`. No access log; temporary files in the prefix.
pub fn start_http(
    dir: &Path,
    name: &str,
    servers: &str,
    listens: &[SocketAddr],
) -> Result<ChildGuard> {
    let temp = dir.join(name).join("temp");
    std::fs::create_dir_all(&temp).context("create nginx temp dir")?;
    // The Debian build points its temporary directories at a system directory it owns.
    let http = format!(
        "http {{\n\
           access_log off;\n\
           client_body_temp_path {temp}/body;\n\
           proxy_temp_path {temp}/proxy;\n\
           fastcgi_temp_path {temp}/fastcgi;\n\
           uwsgi_temp_path {temp}/uwsgi;\n\
           scgi_temp_path {temp}/scgi;\n\
         {servers}}}\n",
        temp = temp.display(),
    );
    start_with(dir, name, "", &http, listens)
}

/// Starts nginx with `blocks` (a `stream` or `http` block) after the common main-context
/// lines; `modules` (`load_module` lines) come first, as nginx requires.
fn start_with(
    dir: &Path,
    name: &str,
    modules: &str,
    blocks: &str,
    listens: &[SocketAddr],
) -> Result<ChildGuard> {
    let program = program()?;
    let prefix = dir.join(name);
    std::fs::create_dir_all(prefix.join("logs")).context("create nginx prefix")?;
    // No access log (none in the stream block, `off` in the http block), error log at
    // `warn`: a tuned deployment does not log every connection either.
    let conf = format!(
        "{modules}\
         worker_processes 1;\n\
         pid {prefix}/nginx.pid;\n\
         error_log {prefix}/logs/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         {blocks}",
        prefix = prefix.display(),
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
    let mut nginx = ChildGuard::spawn(name, cmd, &dir.join(format!("{name}.log")))?;
    for addr in listens {
        nginx.wait_for_port(*addr, Duration::from_secs(10))?;
    }
    Ok(nginx)
}

/// The client side's directives in a `stream` server: TLS 1.3 to the server side with the
/// client certificate, the server's certificate verified against the CA.
pub fn mtls_client_directives(pki: &Pki) -> String {
    format!("proxy_ssl on;\n{}", mtls_http_client_directives(pki))
}

/// The same in an `http` server or location (where TLS follows from `proxy_pass https://`).
pub fn mtls_http_client_directives(pki: &Pki) -> String {
    format!(
        "proxy_ssl_protocols TLSv1.3;\n\
         proxy_ssl_certificate {client_cert};\n\
         proxy_ssl_certificate_key {client_key};\n\
         proxy_ssl_trusted_certificate {ca};\n\
         proxy_ssl_verify on;\n\
         proxy_ssl_name {SERVER_NAME};\n\
         proxy_ssl_session_reuse on;\n",
        client_cert = pki.client_cert.display(),
        client_key = pki.client_key.display(),
        ca = pki.ca.display(),
    )
}

/// The server side's directives (after `listen ... ssl;`): TLS 1.3, a client certificate
/// signed by the CA required.
pub fn mtls_server_directives(pki: &Pki) -> String {
    format!(
        "ssl_protocols TLSv1.3;\n\
         ssl_certificate {server_cert};\n\
         ssl_certificate_key {server_key};\n\
         ssl_verify_client on;\n\
         ssl_client_certificate {ca};\n",
        server_cert = pki.server_cert.display(),
        server_key = pki.server_key.display(),
        ca = pki.ca.display(),
    )
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
