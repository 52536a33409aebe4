//! The backend server behind every contender: a sink for throughput and an echo for
//! request/response (see [`crate::protocol`]).

use anyhow::{Context, Result, bail};
use meshup_tests::bench::LoopbackServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::{MESSAGE_SIZE, MODE_ECHO, MODE_SINK, SINK_READY};

/// Read buffer for the sink: several frames per read system call.
const SINK_BUFFER: usize = 256 * 1024;

/// Starts the backend on 127.0.0.1 (a free port); it serves until dropped.
pub async fn start() -> Result<LoopbackServer> {
    LoopbackServer::start(|stream| async move {
        // A connection that breaks mid-way (a client timing out, a tunnel closing) is not
        // the backend's problem; the client reports it.
        let _ = serve(stream).await;
    })
    .await
}

async fn serve(mut stream: TcpStream) -> Result<()> {
    stream.set_nodelay(true).context("set TCP_NODELAY")?;
    let mut mode = [0u8; 1];
    if stream.read(&mut mode).await.context("read mode byte")? == 0 {
        // A bare connect/close, e.g. a readiness probe.
        return Ok(());
    }
    match mode[0] {
        MODE_SINK => sink(stream).await,
        MODE_ECHO => echo(stream).await,
        other => bail!("unknown mode byte {other:#x}"),
    }
}

/// Counts framed payload bytes until the zero-length frame, then answers with the count.
async fn sink(mut stream: TcpStream) -> Result<()> {
    stream
        .write_all(&[SINK_READY])
        .await
        .context("write ready byte")?;
    let mut buf = vec![0u8; SINK_BUFFER];
    let mut total: u64 = 0;
    loop {
        let mut header = [0u8; 4];
        stream
            .read_exact(&mut header)
            .await
            .context("read frame header")?;
        let mut remaining = u32::from_be_bytes(header) as usize;
        if remaining == 0 {
            break;
        }
        while remaining > 0 {
            let want = remaining.min(buf.len());
            let n = stream
                .read(&mut buf[..want])
                .await
                .context("read frame payload")?;
            if n == 0 {
                bail!("EOF inside a frame");
            }
            remaining -= n;
            total += n as u64;
        }
    }
    stream
        .write_all(&total.to_be_bytes())
        .await
        .context("write byte count")?;
    Ok(())
}

/// Answers every 1 KiB request with 1 KiB until the client closes.
async fn echo(mut stream: TcpStream) -> Result<()> {
    let mut buf = vec![0u8; MESSAGE_SIZE];
    // The mode byte was the first byte of the first request.
    stream
        .read_exact(&mut buf[1..])
        .await
        .context("read first request")?;
    loop {
        stream.write_all(&buf).await.context("write response")?;
        match stream.read_exact(&mut buf).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e).context("read request"),
        }
    }
}
