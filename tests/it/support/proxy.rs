//! A TCP proxy between the daemon and a real service, so a test can cut the service off mid-run
//! (every open connection dropped, new ones refused) or blackhole it (every connection stays
//! open, new ones are accepted, and nothing passes either way: a route that silently drops
//! packets), and bring it back, without touching the shared service itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct TcpProxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Bumped on every cut: copy tasks of older generations end, dropping both sides.
    generation: watch::Sender<u64>,
    /// While true, nothing is forwarded and new connections wait silently.
    blackholed: watch::Sender<bool>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on 127.0.0.1 (an ephemeral port) and forwards every connection to `upstream`.
    pub async fn start(upstream: &str) -> TcpProxy {
        let upstream = upstream.to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let (blackholed, _) = watch::channel(false);
        let accept_task = {
            let cut = cut.clone();
            let generation = generation.clone();
            let blackholed = blackholed.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    if cut.load(Ordering::SeqCst) {
                        drop(client); // refused: closed at once
                        continue;
                    }
                    let mut cut_seen = generation.subscribe();
                    let hole = blackholed.subscribe();
                    let upstream = upstream.clone();
                    tokio::spawn(async move {
                        let forward = async {
                            // Accepted, but silent while blackholed: the server is reached
                            // only once the hole lifts.
                            if hole.clone().wait_for(|h| !*h).await.is_err() {
                                return;
                            }
                            let Ok(server) = TcpStream::connect(&upstream).await else {
                                return;
                            };
                            let (client_read, client_write) = client.into_split();
                            let (server_read, server_write) = server.into_split();
                            tokio::join!(
                                pump(client_read, server_write, hole.clone()),
                                pump(server_read, client_write, hole.clone()),
                            );
                        };
                        tokio::select! {
                            _ = forward => {}
                            _ = cut_seen.changed() => {}
                        }
                    });
                }
            })
        };
        TcpProxy {
            addr,
            cut,
            generation,
            blackholed,
            accept_task,
        }
    }

    /// `127.0.0.1:PORT` of the proxy, for the sink's URL.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every open connection and refuses new ones until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// From now on nothing passes, either way, on any connection (a close neither), and new
    /// connections are accepted but never answered, until [`TcpProxy::lift`]. What was sent
    /// meanwhile is held, and delivered when the hole lifts, as a network that heals does.
    pub fn blackhole(&self) {
        self.blackholed.send_replace(true);
    }

    /// Ends the blackhole: what was held is delivered, and traffic flows again.
    pub fn lift(&self) {
        self.blackholed.send_replace(false);
    }
}

/// Copies `from` to `to` while the hole is closed; what is read while it is open (bytes or the
/// end of the stream) is held until it closes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut hole: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = from.read(&mut buf).await;
        if hole.wait_for(|h| !*h).await.is_err() {
            return;
        }
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}
