//! A TCP proxy that delays the server's replies: an ack (a JetStream PubAck, a PostgreSQL
//! COMMIT's answer) reaches the daemon `delay` after the server acted on it, so a SIGKILL in that
//! time leaves work done on the server that the daemon never saw confirmed. The crash tests use
//! it to make sure redeliveries really happen and are absorbed by the sink's idempotency.

use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A proxy to `upstream` that holds everything the server sends for `delay` (the client's bytes
/// pass at once). Runs until the test process ends.
pub async fn start(upstream: &'static str, delay: Duration) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let upward = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
                let reader = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = server_read.read(&mut buf).await {
                        if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                });
                while let Some((at, bytes)) = rx.recv().await {
                    tokio::time::sleep_until((at + delay).into()).await;
                    if client_write.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                upward.abort();
                reader.abort();
            });
        }
    });
    addr
}
