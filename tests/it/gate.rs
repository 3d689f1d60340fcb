//! A TCP proxy a test can cut or slow: while it is shut, every connection through it is
//! dropped and new ones are closed at once; with a delay, every chunk of bytes waits that
//! long before it is passed on. It stands between a hub and its database.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, PartialEq)]
enum State {
    Open(Duration),
    Shut,
}

pub struct TcpGate {
    pub addr: SocketAddr,
    state: watch::Sender<State>,
    /// Ends the gate's thread (and every connection through it) when dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl TcpGate {
    /// An open gate on a loopback port, forwarding to `target`. It runs on a thread of its
    /// own, so a test that blocks its runtime (waiting for a hub process) does not stop it.
    pub fn start(target: SocketAddr) -> Self {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let (state, watching) = watch::channel(State::Open(Duration::ZERO));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(std_listener).unwrap();
                let accept = async {
                    while let Ok((inbound, _)) = listener.accept().await {
                        if *watching.borrow() == State::Shut {
                            continue; // dropped: closed at once
                        }
                        tokio::spawn(forward(inbound, target, watching.clone()));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
        });
        Self {
            addr,
            state,
            _stop: stop,
        }
    }

    /// A gate in front of the PostgreSQL server of `url`; returns it and the URL through it.
    pub async fn in_front_of(url: &str) -> (Self, String) {
        let authority = url
            .split_once("://")
            .expect("a URL")
            .1
            .split('/')
            .next()
            .unwrap();
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let target = tokio::net::lookup_host(host_port)
            .await
            .unwrap()
            .next()
            .unwrap();
        let gate = Self::start(target);
        let through = url.replacen(host_port, &gate.addr.to_string(), 1);
        assert_ne!(through, url, "the URL goes through the gate");
        (gate, through)
    }

    /// Drops every connection and refuses new ones.
    pub fn shut(&self) {
        self.state.send_replace(State::Shut);
    }

    /// Forwards again, at once.
    pub fn open(&self) {
        self.state.send_replace(State::Open(Duration::ZERO));
    }

    /// Forwards, every chunk of bytes (in either direction) `delay` late.
    pub fn slow(&self, delay: Duration) {
        self.state.send_replace(State::Open(delay));
    }
}

/// Forwards one connection until either side closes or the gate shuts.
async fn forward(inbound: TcpStream, target: SocketAddr, state: watch::Receiver<State>) {
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let mut shut = state.clone();
    tokio::select! {
        _ = pump(in_read, out_write, state.clone()) => {}
        _ = pump(out_read, in_write, state) => {}
        _ = shut.wait_for(|s| *s == State::Shut) => {}
    }
}

/// Copies from `from` to `to` until either side closes, each chunk after the current delay.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: watch::Receiver<State>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay = match *state.borrow() {
            State::Open(delay) => delay,
            State::Shut => return,
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
