//! A fault-injecting network for cluster tests that needs no root: every node gets its own
//! loopback address and a TCP proxy owned by the test, and the test cuts chosen pairs of
//! nodes apart (a partition) and heals them again.
//!
//! Node `i` (the index in [`crate::cluster::Cluster::nodes`]) listens on `127.0.0.(11+i)`
//! and dials its peers from that address (`hashgrid-node --dial-from`), but advertises the
//! port of its proxy, so every connection another node opens to it passes the proxy. The
//! proxy tells the dialing node by the connection's source address, and drops the
//! connection when that pair is cut; a cut also closes the connections already open
//! across it. Connections from any other source (the test's agents on 127.0.0.1) are never
//! cut, so a test can always reach every node, on either side of a partition.
//!
//! Two kinds of cut ([`Fault`]): a refusing one accepts a connection and closes it at once
//! (the dialer learns within one call that the peer is unreachable, as from a stopped
//! process), and a silent one holds connections open and carries nothing (the dialer learns
//! nothing until its own deadlines pass, as behind a dropped route). Healing closes the
//! connections a silent cut held: their streams lost bytes. A slow link (not a cut) delays
//! every byte across it: a follower that learns of commits late.
//!
//! The proxies run on a runtime of their own, so they keep forwarding while the test
//! blocks (node start-up waits synchronously) and whatever runtime the test uses.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How a cut treats the connections across it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// New connections are closed at once, open ones closed: the peer is plainly gone.
    Refuse,
    /// Connections are held open and carry nothing: the peer hangs, and only the dialer's
    /// deadlines tell.
    Silence,
    /// Not a cut: connections carry everything, each byte this much late in each
    /// direction (a distant or congested peer). Open connections are closed when it is
    /// set, so every connection across it is slow.
    Slow(Duration),
}

/// The pairs of nodes that cannot reach each other, each keyed (smaller, larger).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Cuts(HashMap<(usize, usize), Fault>);

impl Cuts {
    /// The cut a connection from `src` (a node, or `None` for anyone else) to node `dst`
    /// crosses, if any.
    fn between(&self, src: Option<usize>, dst: usize) -> Option<Fault> {
        src.and_then(|s| self.0.get(&(s.min(dst), s.max(dst))).copied())
    }
}

/// Where one node listens and what it tells the others.
#[derive(Clone, Copy, Debug)]
pub struct NodeAddrs {
    /// The node's own loopback address: it listens and dials from here.
    pub ip: IpAddr,
    /// The node's real listening address (`--listen`).
    pub listen: SocketAddr,
    /// Its proxy's address, which the node advertises (`--advertise`).
    pub advertise: SocketAddr,
}

/// Connections the proxies refused or closed because of a cut.
#[derive(Debug, Default)]
struct Counters {
    refused: AtomicU64,
    severed: AtomicU64,
    held: AtomicU64,
}

/// The proxies of one cluster and the cuts between its nodes.
pub struct FaultNet {
    runtime: Option<tokio::runtime::Runtime>,
    cuts: watch::Sender<Cuts>,
    nodes: Vec<NodeAddrs>,
    counters: Arc<Counters>,
}

/// The first node's last address octet: 127.0.0.1 stays the agents', and a few addresses
/// are left between.
const FIRST_OCTET: usize = 11;

/// Node `i`'s own loopback address.
pub fn node_ip(i: usize) -> IpAddr {
    let last = u8::try_from(FIRST_OCTET + i).expect("at most 244 nodes behind fault proxies");
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// The node a connection comes from, by its source address; `None` for anyone else.
fn node_of(ip: IpAddr) -> Option<usize> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            let d = usize::from(d);
            ((a, b, c) == (127, 0, 0) && d >= FIRST_OCTET).then(|| d - FIRST_OCTET)
        }
        IpAddr::V6(_) => None,
    }
}

impl FaultNet {
    /// A network with no nodes yet and nothing cut; [`FaultNet::add_node`] adds them.
    pub fn new() -> io::Result<FaultNet> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fault-net")
            .enable_all()
            .build()?;
        Ok(FaultNet {
            runtime: Some(runtime),
            cuts: watch::Sender::new(Cuts::default()),
            nodes: Vec::new(),
            counters: Arc::default(),
        })
    }

    /// Makes the addresses and the proxy of the next node and returns them; the node must
    /// then listen on `listen`, dial from `ip` and advertise `advertise`.
    pub fn add_node(&mut self) -> io::Result<NodeAddrs> {
        let i = self.nodes.len();
        let ip = node_ip(i);
        // The node binds the port itself. Nothing else uses this address, and the node
        // dials from it only once it runs, so the port found free here stays free.
        let listen = std::net::TcpListener::bind((ip, 0))?.local_addr()?;
        let runtime = self.runtime.as_ref().expect("runtime until drop");
        let proxy = runtime.block_on(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))?;
        let advertise = proxy.local_addr()?;
        runtime.spawn(accept(
            proxy,
            i,
            listen,
            self.cuts.subscribe(),
            self.counters.clone(),
        ));
        let addrs = NodeAddrs {
            ip,
            listen,
            advertise,
        };
        self.nodes.push(addrs);
        Ok(addrs)
    }

    /// The addresses of node `i`.
    pub fn node(&self, i: usize) -> NodeAddrs {
        self.nodes[i]
    }

    /// Cuts every node in `a` off from every node in `b` (both ways), on top of the cuts
    /// already made: connections across are treated as `fault` says, open ones included.
    pub fn cut(&self, a: &[usize], b: &[usize], fault: Fault) {
        self.cuts.send_modify(|cuts| {
            for &x in a {
                for &y in b {
                    if x != y {
                        cuts.0.insert((x.min(y), x.max(y)), fault);
                    }
                }
            }
        });
    }

    /// Removes every cut; connections a silent cut held are closed.
    pub fn heal(&self) {
        self.cuts.send_modify(|cuts| cuts.0.clear());
    }

    /// Whether nodes `x` and `y` are cut apart.
    pub fn is_cut(&self, x: usize, y: usize) -> bool {
        self.cuts.borrow().between(Some(x), y).is_some()
    }

    /// Connections refused because they would cross a cut, so far.
    pub fn refused(&self) -> u64 {
        self.counters.refused.load(Ordering::Relaxed)
    }

    /// Open connections closed (or, by a silent cut, frozen) by a cut, so far.
    pub fn severed(&self) -> u64 {
        self.counters.severed.load(Ordering::Relaxed)
    }

    /// New connections a silent cut held without forwarding, so far.
    pub fn held(&self) -> u64 {
        self.counters.held.load(Ordering::Relaxed)
    }
}

impl Drop for FaultNet {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside a test's async context.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The proxy of node `dst`: accepts connections and forwards each to `upstream` unless a
/// cut is in the way.
async fn accept(
    listener: TcpListener,
    dst: usize,
    upstream: SocketAddr,
    cuts: watch::Receiver<Cuts>,
    counters: Arc<Counters>,
) {
    loop {
        // Errors here are per connection (a peer that gave up, descriptors short for a
        // moment): the proxy stays up.
        let Ok((inbound, from)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(forward(
            inbound,
            node_of(from.ip()),
            dst,
            upstream,
            cuts.clone(),
            counters.clone(),
        ));
    }
}

/// Copies bytes both ways between `inbound` (from node `src`, or an agent) and node `dst`
/// at `upstream` until either side closes or a cut comes between them.
async fn forward(
    mut inbound: TcpStream,
    src: Option<usize>,
    dst: usize,
    upstream: SocketAddr,
    mut cuts: watch::Receiver<Cuts>,
    counters: Arc<Counters>,
) {
    let fault = cuts.borrow_and_update().between(src, dst);
    let delay = match fault {
        Some(Fault::Refuse) => {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Some(Fault::Silence) => {
            counters.held.fetch_add(1, Ordering::Relaxed);
            return hold_until_healed(&mut cuts, src, dst).await;
        }
        Some(Fault::Slow(delay)) => Some(delay),
        None => None,
    };
    // A node that is down refuses its proxy, and the proxy closes the inbound side: the
    // dialer sees what it would see without a proxy, an unreachable peer.
    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let copy: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = match delay {
        None => Box::pin(async move {
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        }),
        Some(delay) => {
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            Box::pin(async move {
                tokio::join!(
                    copy_late(in_read, out_write, delay),
                    copy_late(out_read, in_write, delay)
                );
            })
        }
    };
    tokio::pin!(copy);
    loop {
        tokio::select! {
            _ = &mut copy => return,
            changed = cuts.changed() => {
                // The sender goes with the FaultNet: then the test is over.
                if changed.is_err() {
                    return;
                }
                let now = cuts.borrow_and_update().between(src, dst);
                if now != fault {
                    counters.severed.fetch_add(1, Ordering::Relaxed);
                    if now == Some(Fault::Silence) {
                        // The copy is no longer polled: both sockets stay open, silent.
                        hold_until_healed(&mut cuts, src, dst).await;
                    }
                    return;
                }
            }
        }
    }
}

/// Copies `from` to `to`, each read passed on `delay` after it arrived, in order, until
/// `from` ends (then `to` is shut down once the rest is passed on) or `to` fails.
async fn copy_late(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                return;
            }
        }
    };
    let write = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// Waits (holding the caller's sockets open, unread) until no cut lies between `src` and
/// `dst` or the network is gone.
async fn hold_until_healed(cuts: &mut watch::Receiver<Cuts>, src: Option<usize>, dst: usize) {
    let _ = cuts.wait_for(|c| c.between(src, dst).is_none()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpSocket;

    /// A network of `n` nodes whose "nodes" are echo servers on their listen addresses.
    fn echo_net(n: usize) -> FaultNet {
        let mut net = FaultNet::new().unwrap();
        for _ in 0..n {
            let addrs = net.add_node().unwrap();
            let rt = net.runtime.as_ref().unwrap();
            let listener = rt.block_on(TcpListener::bind(addrs.listen)).unwrap();
            rt.spawn(async move {
                loop {
                    let (mut s, _) = listener.accept().await.unwrap();
                    tokio::spawn(async move {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    });
                }
            });
        }
        net
    }

    /// Connects from `from` (a node's address, or 127.0.0.1) to node `to`'s proxy.
    async fn dial(net: &FaultNet, from: IpAddr, to: usize) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        socket.connect(net.node(to).advertise).await.unwrap()
    }

    /// Whether `stream` still carries bytes to the echo server and back (false when the
    /// proxy closed it).
    async fn echoes(stream: &mut TcpStream) -> bool {
        let deadline = Duration::from_secs(5);
        let round_trip = async {
            stream.write_all(b"ping").await?;
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).await?;
            io::Result::Ok(&buf == b"ping")
        };
        match tokio::time::timeout(deadline, round_trip).await {
            Ok(r) => r.unwrap_or(false),
            Err(_) => panic!("no answer and no close within {deadline:?}"),
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn connections_are_told_apart_by_source_address() {
        assert_eq!(node_of(node_ip(0)), Some(0));
        assert_eq!(node_of(node_ip(4)), Some(4));
        assert_eq!(node_of(IpAddr::V4(Ipv4Addr::LOCALHOST)), None);
    }

    #[test]
    fn a_cut_pair_cannot_connect_and_an_uncut_pair_can() {
        let net = echo_net(3);
        net.cut(&[0], &[1, 2], Fault::Refuse);
        assert!(net.is_cut(1, 0) && !net.is_cut(1, 2));
        block_on(async {
            assert!(!echoes(&mut dial(&net, node_ip(0), 1).await).await);
            assert!(!echoes(&mut dial(&net, node_ip(2), 0).await).await);
            assert!(echoes(&mut dial(&net, node_ip(1), 2).await).await);
            assert!(echoes(&mut dial(&net, node_ip(2), 1).await).await);
        });
        assert_eq!(net.refused(), 2);
    }

    #[test]
    fn a_slow_link_carries_everything_late_until_healed() {
        let net = echo_net(2);
        let delay = Duration::from_millis(150);
        block_on(async {
            let mut before = dial(&net, node_ip(0), 1).await;
            assert!(echoes(&mut before).await);
            net.cut(&[0], &[1], Fault::Slow(delay));
            // The connection open before the link turned slow is closed.
            assert!(!echoes(&mut before).await);
            let mut slow = dial(&net, node_ip(0), 1).await;
            let started = Instant::now();
            assert!(echoes(&mut slow).await && echoes(&mut slow).await);
            // Two round trips, each late both ways.
            assert!(started.elapsed() >= 4 * delay, "{:?}", started.elapsed());
            // Healing closes the slow connection; a new one is not slowed (not timed here:
            // a busy machine may take any time).
            net.heal();
            assert!(!echoes(&mut slow).await);
            assert!(echoes(&mut dial(&net, node_ip(0), 1).await).await);
        });
    }

    #[test]
    fn agents_reach_every_node_across_a_cut() {
        let net = echo_net(2);
        net.cut(&[0], &[1], Fault::Refuse);
        block_on(async {
            for to in 0..2 {
                let agent = IpAddr::V4(Ipv4Addr::LOCALHOST);
                assert!(echoes(&mut dial(&net, agent, to).await).await);
            }
        });
        assert_eq!(net.refused(), 0);
    }

    #[test]
    fn a_cut_closes_open_connections_across_it_and_heal_restores() {
        let net = echo_net(3);
        block_on(async {
            let mut across = dial(&net, node_ip(0), 1).await;
            let mut beside = dial(&net, node_ip(1), 2).await;
            assert!(echoes(&mut across).await && echoes(&mut beside).await);

            net.cut(&[0], &[1], Fault::Refuse);
            let mut buf = [0u8; 1];
            let closed = tokio::time::timeout(Duration::from_secs(5), across.read(&mut buf))
                .await
                .expect("the cut closes the connection");
            assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
            assert!(echoes(&mut beside).await);

            net.heal();
            assert!(echoes(&mut dial(&net, node_ip(0), 1).await).await);
            assert!(echoes(&mut dial(&net, node_ip(1), 0).await).await);
        });
        assert_eq!(net.severed(), 1);
    }

    /// Reads until the connection ends; what arrived before.
    async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let read = stream.read_to_end(&mut got);
        match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(_) => got,
            Err(_) => panic!("not closed within 5 s"),
        }
    }

    #[test]
    fn a_silent_cut_holds_connections_carrying_nothing_until_heal_closes_them() {
        let net = echo_net(2);
        block_on(async {
            let mut open = dial(&net, node_ip(0), 1).await;
            assert!(echoes(&mut open).await);
            net.cut(&[0], &[1], Fault::Silence);
            let mut new = dial(&net, node_ip(1), 0).await;
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while net.held() + net.severed() < 2 {
                assert!(std::time::Instant::now() < deadline, "cut not applied");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            open.write_all(b"lost").await.unwrap();
            new.write_all(b"lost").await.unwrap();

            net.heal();
            assert_eq!(read_to_close(&mut open).await, b"");
            assert_eq!(read_to_close(&mut new).await, b"");
            assert!(echoes(&mut dial(&net, node_ip(0), 1).await).await);
        });
        assert_eq!((net.held(), net.severed(), net.refused()), (1, 1, 0));
    }
}
