//! [`HierComm`]: shared memory inside each machine, MPI between machines
//! (the `mpi` feature).
//!
//! The ranks of a machine ("node") form a [`ShmGroup`]; the lowest world
//! rank of each node is its *leader*, and the leaders form an [`MpiComm`].
//! A collective runs in three steps:
//!
//! | collective | inside each node | between leaders | inside each node |
//! |---|---|---|---|
//! | allreduce | shm reduce to the leader | MPI allreduce | shm broadcast |
//! | reduce to `root` | shm reduce to the leader | MPI reduce to `root`'s leader | shm broadcast to `root` (when it is not the leader) |
//! | broadcast from `root` | shm broadcast from `root` on its node | MPI broadcast from `root`'s leader | shm broadcast on the other nodes |
//! | allgather | shm allgather | MPI allgather of the node blocks | shm broadcast |
//! | barrier | shm barrier | MPI barrier | shm barrier |
//!
//! With a single node the shared-memory group does the whole collective
//! alone, and with one rank per node the leaders' MPI communicator does, so
//! neither case pays for the other layer.
//!
//! Ranks are the MPI world ranks (of the communicator it was made from).
//! Sums are taken in a fixed order, the same on every run for a fixed
//! layout: within a node in rank order, then node sums in node order (nodes
//! ordered by their leader's rank). This differs from the flat rank order
//! of [`MpiComm`] as soon as there are several nodes of several ranks, so
//! results equal `MpiComm`'s within rounding, not bitwise.
//!
//! # The node split
//!
//! [`NodeSplit`] decides which ranks share a machine: by default the MPI
//! library's shared-memory domains (`MPI_Comm_split_type` with
//! `MPI_COMM_TYPE_SHARED`), unless the environment variable
//! `KFAC_NODE_SIZE=k` is set, which groups consecutive ranks `k` at a time
//! (ranks `0..k` are node 0, `k..2k` node 1, ...): this presents one
//! machine as several, for tests. Ranks grouped into one node must really
//! share a machine (they meet in `/dev/shm`).
//!
//! The shared-memory group's name is chosen by each node's leader (its pid,
//! rank and a timestamp) and sent to the node's other ranks over MPI during
//! construction, so the names of different nodes never collide.
//!
//! ```no_run
//! use kfac_runtime::comm::{hier::{HierComm, HierOptions}, Communicator};
//! let _universe = kfac_runtime::comm::mpi::init()?; // keep alive until the end
//! let mut c = HierComm::world(HierOptions::default())?;
//! let mut v = vec![c.rank() as f32; 8];
//! c.allreduce_f32(&mut v)?;
//! # Ok::<(), kfac_runtime::comm::CommError>(())
//! ```

use std::os::raw::c_int;

use mpi::ffi;
use mpi::raw::AsRaw;

use super::mpi::{MpiComm, MpiOptions};
use super::shm::{ShmGroup, ShmOptions};
use super::{check_elem, check_root, CommError, Communicator, Local, ReduceType};

/// The environment variable that groups consecutive ranks into nodes
/// (see the [module docs](self)).
pub const NODE_SIZE_VAR: &str = "KFAC_NODE_SIZE";

/// How ranks are assigned to nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NodeSplit {
    /// [`NodeSize`](Self::NodeSize) from `KFAC_NODE_SIZE` when it is set,
    /// otherwise [`Shared`](Self::Shared).
    #[default]
    Auto,
    /// The MPI library's shared-memory domains (`MPI_COMM_TYPE_SHARED`).
    Shared,
    /// Consecutive ranks, this many per node (the last node may be
    /// smaller).
    NodeSize(usize),
    /// This rank's node identifier: ranks passing the same value form a
    /// node (every rank passes its own).
    NodeId(u32),
}

/// Options of a hierarchical communicator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HierOptions {
    /// The leaders' MPI communicator (and the set-up exchanges).
    pub mpi: MpiOptions,
    /// The shared-memory group of each node.
    pub shm: ShmOptions,
    /// Which ranks share a node.
    pub split: NodeSplit,
}

/// Who is where: nodes ordered by their leader's rank, members of a node
/// ordered by rank.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Layout {
    /// Node index of each world rank.
    node_of: Vec<usize>,
    /// Rank within its node of each world rank.
    local_of: Vec<usize>,
    /// World ranks of each node, in node-local order.
    members: Vec<Vec<usize>>,
}

impl Layout {
    /// From every rank's node key (equal keys = same node).
    fn from_keys(keys: &[u64]) -> Self {
        let mut order: Vec<u64> = Vec::new(); // keys in order of first rank
        for &k in keys {
            if !order.contains(&k) {
                order.push(k);
            }
        }
        let mut members = vec![Vec::new(); order.len()];
        let mut node_of = vec![0; keys.len()];
        let mut local_of = vec![0; keys.len()];
        for (r, k) in keys.iter().enumerate() {
            let n = order.iter().position(|o| o == k).unwrap_or(0);
            node_of[r] = n;
            local_of[r] = members[n].len();
            members[n].push(r);
        }
        Layout {
            node_of,
            local_of,
            members,
        }
    }
}

/// A hierarchical communicator: see the [module docs](self).
///
/// Errors: invalid arguments found before any communication (a bad root or
/// element length) are returned and leave it usable. Any failure once a
/// collective has started to communicate breaks it for good (every later
/// call returns that error) and aborts the node's shared-memory group, so
/// that the node's other ranks fail fast instead of waiting for a stage
/// that will never come, or pairing it with their next call.
pub struct HierComm {
    rank: usize,
    size: usize,
    layout: Layout,
    /// The node's shared-memory group (or [`Local`] on a node of one).
    node: Box<dyn Communicator>,
    /// The leaders' communicator (leaders only).
    leaders: Option<MpiComm>,
    broken: Option<CommError>,
    /// Set by a collective once its argument checks passed (see `guard`).
    staged: bool,
}

impl std::fmt::Debug for HierComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HierComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("nodes", &self.layout.members)
            .field("broken", &self.broken)
            .finish()
    }
}

fn invalid(reason: String) -> CommError {
    CommError::InvalidArgument { reason }
}

/// This rank's node key under `split`, or why it has none. Calls MPI
/// (collectively) only for [`NodeSplit::Shared`].
fn node_key(base: &MpiComm, split: NodeSplit) -> Result<Result<u64, String>, CommError> {
    let split = match split {
        NodeSplit::Auto => match std::env::var(NODE_SIZE_VAR) {
            Ok(v) => match v.trim().parse::<usize>() {
                Ok(k) if k > 0 => NodeSplit::NodeSize(k),
                _ => {
                    return Ok(Err(format!(
                        "{NODE_SIZE_VAR}={v:?} is not a positive integer"
                    )))
                }
            },
            Err(_) => NodeSplit::Shared,
        },
        s => s,
    };
    Ok(match split {
        NodeSplit::Auto | NodeSplit::Shared => {
            // SAFETY: an all-zero handle is a valid placeholder.
            let mut node: ffi::MPI_Comm = unsafe { std::mem::zeroed() };
            // SAFETY: `base` is a live intra-communicator; collective over
            // it (every rank of `base` is constructing); `node` writable.
            let rc = unsafe {
                ffi::MPI_Comm_split_type(
                    base.as_raw(),
                    ffi::RSMPI_COMM_TYPE_SHARED,
                    base.rank() as c_int,
                    ffi::RSMPI_INFO_NULL,
                    &mut node,
                )
            };
            if rc != ffi::MPI_SUCCESS as c_int {
                return Err(CommError::Mpi {
                    call: "MPI_Comm_split_type",
                    code: rc,
                    reason: "splitting by shared-memory domain failed".into(),
                });
            }
            // The node's key is its lowest world rank: gather nothing,
            // just ask the node communicator for rank 0's world rank via a
            // broadcast on it.
            // SAFETY: `node` was just created by MPI for us.
            let mut node = unsafe { MpiComm::from_owned(node, base.options())? };
            let mut key = (base.rank() as u64).to_le_bytes();
            node.broadcast_bytes(&mut key, 0)?;
            Ok(u64::from_le_bytes(key))
        }
        NodeSplit::NodeSize(0) => Err("node size 0".to_string()),
        NodeSplit::NodeSize(k) => Ok((base.rank() / k) as u64),
        NodeSplit::NodeId(id) => Ok(id as u64),
    })
}

/// A name for a node's shared-memory group, unique on its machine.
fn group_name(rank: usize) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("hier-{}-{rank}-{nanos}", std::process::id())
}

impl HierComm {
    /// Over the ranks of `MPI_COMM_WORLD`. Collective.
    ///
    /// # Errors
    /// As [`MpiComm::world`]; [`CommError::InvalidArgument`] when the node
    /// split is invalid on some rank (reported on every rank); the
    /// shared-memory group's [`CommError::Setup`] errors (every rank fails
    /// when any node's group fails).
    pub fn world(opts: HierOptions) -> Result<Self, CommError> {
        Self::build(MpiComm::world(opts.mpi)?, opts)
    }

    /// Over the ranks of `comm` (duplicated; it stays the caller's).
    /// Collective over `comm`.
    ///
    /// # Errors
    /// As [`world`](Self::world).
    pub fn from_communicator<C>(comm: &C, opts: HierOptions) -> Result<Self, CommError>
    where
        C: mpi::topology::Communicator + AsRaw<Raw = ffi::MPI_Comm>,
    {
        Self::build(MpiComm::from_communicator(comm, opts.mpi)?, opts)
    }

    /// Over the ranks of the raw handle `comm` (duplicated; it stays the
    /// caller's). Collective over `comm`.
    ///
    /// # Safety
    /// As [`MpiComm::from_raw`].
    ///
    /// # Errors
    /// As [`world`](Self::world).
    pub unsafe fn from_raw(comm: ffi::MPI_Comm, opts: HierOptions) -> Result<Self, CommError> {
        // SAFETY: forwarded contract.
        Self::build(unsafe { MpiComm::from_raw(comm, opts.mpi)? }, opts)
    }

    /// Over the ranks of the communicator whose Fortran handle is `fcomm`
    /// (`MPI_Comm_c2f(comm)`; duplicated, it stays the caller's), for C
    /// callers. Collective over the communicator.
    ///
    /// # Safety
    /// As [`MpiComm::from_fortran`].
    ///
    /// # Errors
    /// As [`world`](Self::world).
    pub unsafe fn from_fortran(fcomm: i32, opts: HierOptions) -> Result<Self, CommError> {
        // SAFETY: forwarded contract.
        Self::build(unsafe { MpiComm::from_fortran(fcomm, opts.mpi)? }, opts)
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.layout.members.len()
    }

    /// This rank's node index (nodes ordered by their lowest rank).
    pub fn node(&self) -> usize {
        self.layout.node_of[self.rank]
    }

    /// Whether this rank is its node's leader (lowest rank of the node).
    pub fn is_leader(&self) -> bool {
        self.layout.local_of[self.rank] == 0
    }

    fn build(mut base: MpiComm, opts: HierOptions) -> Result<Self, CommError> {
        let (rank, size) = (base.rank(), base.size());
        // 1. Every rank's node key, so all ranks agree on the layout (and
        //    fail together when one rank's split is invalid).
        let key = node_key(&base, opts.split)?;
        let mut msg = vec![0u8; 9];
        match &key {
            Ok(k) => {
                msg[0] = 1;
                msg[1..].copy_from_slice(&k.to_le_bytes());
            }
            Err(why) => msg.extend_from_slice(why.as_bytes()),
        }
        let (all, sizes) = base.allgather_bytes(&msg)?;
        let mut keys = Vec::with_capacity(size);
        let mut at = 0;
        for (r, &n) in sizes.iter().enumerate() {
            let m = &all[at..at + n];
            at += n;
            if n < 9 || m[0] != 1 {
                let why = String::from_utf8_lossy(m.get(9..).unwrap_or_default()).into_owned();
                return Err(invalid(format!("rank {r}: invalid node split: {why}")));
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&m[1..9]);
            keys.push(u64::from_le_bytes(b));
        }
        let layout = Layout::from_keys(&keys);
        let my_node = layout.node_of[rank];
        let local = layout.local_of[rank];
        let leader = local == 0;
        // 2. The leaders' communicator (ordered by world rank = node order).
        // SAFETY: an all-zero handle is a valid placeholder.
        let mut lc: ffi::MPI_Comm = unsafe { std::mem::zeroed() };
        // SAFETY: `base` is live; collective over it; the undefined color
        // gives MPI_COMM_NULL on non-leaders.
        let rc = unsafe {
            let color = if leader { 0 } else { ffi::RSMPI_UNDEFINED };
            ffi::MPI_Comm_split(base.as_raw(), color, rank as c_int, &mut lc)
        };
        if rc != ffi::MPI_SUCCESS as c_int {
            return Err(CommError::Mpi {
                call: "MPI_Comm_split",
                code: rc,
                reason: "making the leaders' communicator failed".into(),
            });
        }
        let leaders = if leader {
            // SAFETY: `lc` is a fresh communicator created for us.
            Some(unsafe { MpiComm::from_owned(lc, opts.mpi)? })
        } else {
            None
        };
        // 3. Each leader names its node's group; everybody learns the names
        //    (one allgather on the set-up communicator), then joins.
        let name = if leader {
            group_name(rank)
        } else {
            String::new()
        };
        let (names, nsizes) = base.allgather_bytes(name.as_bytes())?;
        let leader_rank = layout.members[my_node][0];
        let off: usize = nsizes[..leader_rank].iter().sum();
        let my_name = String::from_utf8_lossy(&names[off..off + nsizes[leader_rank]]).into_owned();
        let node_size = layout.members[my_node].len();
        let joined: Result<Box<dyn Communicator>, CommError> = if node_size == 1 {
            Ok(Box::new(Local::new()))
        } else {
            ShmGroup::join(&my_name, local, node_size, opts.shm)
                .map(|g| Box::new(g) as Box<dyn Communicator>)
        };
        // 4. Fail together when any node's group failed.
        let ok = [u8::from(joined.is_ok())];
        let (oks, _) = base.allgather_bytes(&ok)?;
        let node = joined?;
        if let Some(bad) = oks.iter().position(|&b| b != 1) {
            return Err(CommError::Setup {
                reason: format!("rank {bad} could not join its node's shared-memory group"),
            });
        }
        Ok(HierComm {
            rank,
            size,
            layout,
            node,
            leaders,
            broken: None,
            staged: false,
        })
    }

    fn guard<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, CommError>,
    ) -> Result<T, CommError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        self.staged = false;
        let r = f(self);
        if let Err(e) = &r {
            // A collective here runs in stages (node group, leaders, node
            // group); a rank that fails in one stage does not take part in
            // the next, so the others could pair its next call with a stage
            // of this one. An error once the stages have begun therefore
            // breaks the communicator for good, and the node group is told
            // so its ranks fail fast. Invalid arguments found before any
            // communication (the same on every rank when every rank passes
            // the same arguments) leave it usable.
            if self.staged || !matches!(e, CommError::InvalidArgument { .. }) {
                self.broken = Some(e.clone());
                self.node.abort_group();
            }
        }
        r
    }

    /// Which layer does everything alone, if one does, with `root`'s rank
    /// in that layer (single node: its rank in the node; one rank per
    /// node: its node index).
    fn single_layer(&mut self, root: usize) -> Option<(&mut dyn Communicator, usize)> {
        let l = &self.layout;
        if l.members.len() == 1 {
            let r = l.local_of.get(root).copied().unwrap_or(root);
            Some((self.node.as_mut(), r))
        } else if l.members.iter().all(|m| m.len() == 1) {
            let r = l.node_of.get(root).copied().unwrap_or(root);
            self.leaders
                .as_mut()
                .map(|c| (c as &mut dyn Communicator, r))
        } else {
            None
        }
    }

    fn local(&self) -> usize {
        self.layout.local_of[self.rank]
    }

    fn leaders(&mut self) -> Result<&mut MpiComm, CommError> {
        self.leaders.as_mut().ok_or_else(|| CommError::Setup {
            reason: "a leader without the leaders' communicator".into(),
        })
    }

    fn allreduce_impl(&mut self, data: &mut [u8], ty: ReduceType) -> Result<(), CommError> {
        check_elem(data.len(), ty)?;
        self.staged = true;
        if let Some((c, _)) = self.single_layer(0) {
            return c.allreduce_bytes(data, ty);
        }
        self.node.reduce_bytes(data, ty, 0)?;
        if self.local() == 0 {
            self.leaders()?.allreduce_bytes(data, ty)?;
        }
        self.node.broadcast_bytes(data, 0)
    }

    fn reduce_impl(
        &mut self,
        data: &mut [u8],
        ty: ReduceType,
        root: usize,
    ) -> Result<(), CommError> {
        check_elem(data.len(), ty)?;
        check_root(root, self.size)?;
        self.staged = true;
        if let Some((c, r)) = self.single_layer(root) {
            return c.reduce_bytes(data, ty, r);
        }
        let (rn, rl) = (self.layout.node_of[root], self.layout.local_of[root]);
        let me = self.rank;
        let my_node = self.layout.node_of[me];
        let leader = self.local() == 0;
        // A leader that is not the root works on a copy: the caller's data
        // must stay as it was.
        let mut tmp = if leader && me != root {
            data.to_vec()
        } else {
            Vec::new()
        };
        {
            let buf: &mut [u8] = if leader && me != root { &mut tmp } else { data };
            self.node.reduce_bytes(buf, ty, 0)?;
            if leader {
                self.leaders()?.reduce_bytes(buf, ty, rn)?;
            }
        }
        if my_node == rn && rl != 0 {
            if leader {
                self.node.broadcast_bytes(&mut tmp, 0)?;
            } else if me == root {
                self.node.broadcast_bytes(data, 0)?;
            } else {
                self.node.broadcast_discard(data.len(), 0)?;
            }
        }
        Ok(())
    }

    /// Broadcast; `data = None` discards (not allowed on the root).
    fn bcast_impl(
        &mut self,
        data: Option<&mut [u8]>,
        len: usize,
        root: usize,
    ) -> Result<(), CommError> {
        check_root(root, self.size)?;
        if data.is_none() && self.rank == root {
            return Err(invalid(
                "the root of a broadcast cannot discard its own data".into(),
            ));
        }
        self.staged = true;
        if let Some((c, r)) = self.single_layer(root) {
            return match data {
                Some(d) => c.broadcast_bytes(d, r),
                None => c.broadcast_discard(len, r),
            };
        }
        let (rn, rl) = (self.layout.node_of[root], self.layout.local_of[root]);
        let my_node = self.layout.node_of[self.rank];
        let leader = self.local() == 0;
        // Leaders forward the data, so a discarding leader needs a buffer.
        let mut tmp = if data.is_none() && leader {
            vec![0u8; len]
        } else {
            Vec::new()
        };
        let mut data = data;
        if data.is_none() && leader {
            data = Some(&mut tmp);
        }
        // 1. root's node: from the root to its leader (and everybody there).
        if my_node == rn && rl != 0 {
            match data.as_deref_mut() {
                Some(d) => self.node.broadcast_bytes(d, rl)?,
                None => self.node.broadcast_discard(len, rl)?,
            }
        }
        // 2. between leaders.
        if leader {
            let d = data
                .as_deref_mut()
                .ok_or_else(|| invalid("a leader without a buffer".into()))?;
            self.leaders()?.broadcast_bytes(d, rn)?;
        }
        // 3. the other nodes (and the root's node when the root leads it).
        if my_node != rn || rl == 0 {
            match data {
                Some(d) => self.node.broadcast_bytes(d, 0)?,
                None => self.node.broadcast_discard(len, 0)?,
            }
        }
        Ok(())
    }

    fn allgather_impl(&mut self, send: &[u8]) -> Result<(Vec<u8>, Vec<usize>), CommError> {
        self.staged = true;
        if let Some((c, _)) = self.single_layer(0) {
            // A single node gathers in node-local order, which is rank
            // order; one rank per node gathers in node order, also rank
            // order (nodes are ordered by their lowest rank).
            return c.allgather_bytes(send);
        }
        let (blob, node_sizes) = self.node.allgather_bytes(send)?;
        let mut msg = Vec::new();
        if self.local() == 0 {
            // Leader: [sizes of my node's members as u64][their data],
            // exchanged between leaders, then assembled in world order as
            // [every rank's size as u64][data in rank order].
            let mut mine = Vec::with_capacity(node_sizes.len() * 8 + blob.len());
            for s in &node_sizes {
                mine.extend_from_slice(&(*s as u64).to_le_bytes());
            }
            mine.extend_from_slice(&blob);
            let (all, per_node) = self.leaders()?.allgather_bytes(&mine)?;
            let mut pieces: Vec<&[u8]> = vec![&[]; self.size];
            let mut at = 0;
            for (n, &len) in per_node.iter().enumerate() {
                let part = &all[at..at + len];
                at += len;
                let members = &self.layout.members[n];
                let head = members.len() * 8;
                if part.len() < head {
                    return Err(invalid(format!("node {n} sent a short allgather block")));
                }
                let mut off = head;
                for (i, &r) in members.iter().enumerate() {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&part[i * 8..i * 8 + 8]);
                    let s = usize::try_from(u64::from_le_bytes(b)).unwrap_or(usize::MAX);
                    let end = off
                        .checked_add(s)
                        .filter(|&e| e <= part.len())
                        .ok_or_else(|| invalid(format!("node {n} sent a bad allgather size")))?;
                    pieces[r] = &part[off..end];
                    off = end;
                }
            }
            let total: usize = pieces.iter().map(|p| p.len()).sum();
            msg.reserve(self.size * 8 + total);
            for p in &pieces {
                msg.extend_from_slice(&(p.len() as u64).to_le_bytes());
            }
            for p in &pieces {
                msg.extend_from_slice(p);
            }
        }
        // Fan out: the length, then the message.
        let mut len = (msg.len() as u64).to_le_bytes();
        self.node.broadcast_bytes(&mut len, 0)?;
        let len = usize::try_from(u64::from_le_bytes(len))
            .map_err(|_| invalid("allgather result does not fit in memory".into()))?;
        if self.local() != 0 {
            msg = vec![0u8; len];
        }
        self.node.broadcast_bytes(&mut msg, 0)?;
        let head = self.size * 8;
        if msg.len() < head {
            return Err(invalid("short allgather result".into()));
        }
        let sizes: Vec<usize> = msg[..head]
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                usize::try_from(u64::from_le_bytes(b)).unwrap_or(usize::MAX)
            })
            .collect();
        if sizes.iter().try_fold(0usize, |a, &s| a.checked_add(s)) != Some(msg.len() - head) {
            return Err(invalid("inconsistent allgather result".into()));
        }
        msg.drain(..head);
        Ok((msg, sizes))
    }

    fn barrier_impl(&mut self) -> Result<(), CommError> {
        self.staged = true;
        if let Some((c, _)) = self.single_layer(0) {
            return c.barrier();
        }
        self.node.barrier()?;
        if self.local() == 0 {
            self.leaders()?.barrier()?;
        }
        self.node.barrier()
    }
}

impl Communicator for HierComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn allreduce_bytes(&mut self, data: &mut [u8], ty: ReduceType) -> Result<(), CommError> {
        self.guard(|c| c.allreduce_impl(data, ty))
    }
    fn reduce_bytes(
        &mut self,
        data: &mut [u8],
        ty: ReduceType,
        root: usize,
    ) -> Result<(), CommError> {
        self.guard(|c| c.reduce_impl(data, ty, root))
    }
    fn broadcast_bytes(&mut self, data: &mut [u8], root: usize) -> Result<(), CommError> {
        let len = data.len();
        self.guard(|c| c.bcast_impl(Some(data), len, root))
    }
    fn broadcast_discard(&mut self, len: usize, root: usize) -> Result<(), CommError> {
        self.guard(|c| c.bcast_impl(None, len, root))
    }
    fn allgather_bytes(&mut self, send: &[u8]) -> Result<(Vec<u8>, Vec<usize>), CommError> {
        self.guard(|c| c.allgather_impl(send))
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.guard(|c| c.barrier_impl())
    }
}

#[cfg(test)]
mod tests {
    use super::Layout;

    #[test]
    fn layout_orders_nodes_by_lowest_rank_and_members_by_rank() {
        let l = Layout::from_keys(&[7, 3, 7, 3, 9]);
        assert_eq!(l.members, vec![vec![0, 2], vec![1, 3], vec![4]]);
        assert_eq!(l.node_of, vec![0, 1, 0, 1, 2]);
        assert_eq!(l.local_of, vec![0, 0, 1, 1, 0]);
    }
}
