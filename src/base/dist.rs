//! Data-parallel training over MPI: the process group, and the collectives training needs
//! (docs/DESIGN.md §14).
//!
//! `mpirun -n P itt train ...` starts P copies of the same command. Each rank draws the same
//! global batch from the same data stream, computes the gradients of its own share of the
//! micro-batches, and [`Group::sum_in_rank_order`] adds the ranks' sums in rank order, so every
//! rank holds the same bits and takes the same optimiser step. With one micro-batch per rank
//! the sum is the single process's `--grad-accum P` sum, bit for bit.
//!
//! Without the cargo feature `mpi` the group is always the single process, and a launch by
//! `mpirun` is refused (P copies would train P separate runs into one folder).

use crate::base::error::{Error, Result};

/// The ranks training one run together. `Group::single()` is the one-process group.
#[derive(Clone, Debug)]
pub struct Group {
    rank: usize,
    size: usize,
}

impl Default for Group {
    fn default() -> Self {
        Self::single()
    }
}

/// Ranks in the job that started this process, read from the launcher's environment
/// (Open MPI, then MPICH/PMI); `None` when not started by an MPI launcher.
pub fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Ranks of this job on this machine (Open MPI only), to share the cores among them.
pub fn launched_local_size() -> Option<usize> {
    std::env::var("OMPI_COMM_WORLD_LOCAL_SIZE").ok().and_then(|v| v.trim().parse().ok()).filter(|&n| n > 0)
}

/// This process's rank in the job (0 when not launched by mpirun), read before MPI starts.
pub fn launched_rank() -> usize {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"]
        .iter()
        .find_map(|k| std::env::var(k).ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// This process's rank among the job's ranks on its machine (0 when not launched by mpirun).
pub fn launched_local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"]
        .iter()
        .find_map(|k| std::env::var(k).ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

impl Group {
    pub fn single() -> Self {
        Group { rank: 0, size: 1 }
    }

    /// The group this process was launched in: MPI's world when started by `mpirun` (MPI is
    /// initialised here, once), else the single process.
    pub fn from_launch() -> Result<Self> {
        match launched_size() {
            None | Some(1) => Ok(Self::single()),
            Some(p) => imp::world(p),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank 0, the one that writes checkpoints, metrics and output.
    pub fn is_lead(&self) -> bool {
        self.rank == 0
    }

    pub fn is_distributed(&self) -> bool {
        self.size > 1
    }

    /// Which of `total` micro-batches this rank computes: a contiguous block in rank order, so
    /// that the rank-ordered sum adds them in the single process's order.
    pub fn share(&self, total: usize) -> Result<std::ops::Range<usize>> {
        if !total.is_multiple_of(self.size) {
            return Err(Error::usage(format!(
                "--grad-accum {total} does not split over {} ranks; with mpirun -n P, --grad-accum counts the \
                 micro-batches of the whole step and must be a multiple of P",
                self.size
            )));
        }
        let per = total / self.size;
        Ok(self.rank * per..(self.rank + 1) * per)
    }

    /// Replace each rank's buffers by the sum over ranks, added in rank order
    /// (((r0 + r1) + r2) + ...), the same bits on every rank. All ranks pass buffers of the same
    /// shapes. The sum is split over the ranks (each adds one slice of the flattened buffers,
    /// then the slices are gathered), so each rank sends and receives 2 (P - 1) / P of the data.
    pub fn sum_in_rank_order(&self, bufs: &mut [Vec<f32>]) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        let mut flat: Vec<f32> = Vec::with_capacity(bufs.iter().map(Vec::len).sum());
        for b in bufs.iter() {
            flat.extend_from_slice(b);
        }
        imp::sum_in_rank_order(self, &mut flat)?;
        let mut at = 0;
        for b in bufs.iter_mut() {
            let n = b.len();
            b.copy_from_slice(&flat[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// Every rank's `values` (the same count on each), concatenated in rank order.
    pub fn all_gather_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        if self.size == 1 {
            return Ok(values.to_vec());
        }
        imp::all_gather_f64(self, values)
    }

    /// Every rank's bytes (any length), in rank order.
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        if self.size == 1 {
            return Ok(vec![bytes.to_vec()]);
        }
        imp::all_gather_bytes(self, bytes)
    }

    /// Rank 0's `bytes` on every rank: each rank passes a buffer of the same length, which
    /// rank 0's contents overwrite (used to hand out the NCCL unique id, DESIGN §14).
    pub fn broadcast_bytes(&self, bytes: &mut [u8]) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        imp::broadcast_bytes(bytes)
    }

    /// Wait until every rank gets here.
    pub fn barrier(&self) {
        if self.size > 1 {
            imp::barrier();
        }
    }

    /// An error unless every rank passes the same `fingerprint` (of weights, optimiser state,
    /// data position): ranks that disagree would silently train different models.
    pub fn check_agree(&self, what: &str, fingerprint: u64) -> Result<()> {
        let all = self.all_gather_bytes(&fingerprint.to_le_bytes())?;
        match all.iter().position(|b| b[..] != fingerprint.to_le_bytes()) {
            None => Ok(()),
            Some(r) => Err(Error::usage(format!(
                "rank {r} holds a different {what} than rank {}; every rank must start from the same run folder \
                 (a shared filesystem, or identical copies)",
                self.rank
            ))),
        }
    }
}

/// Split `n` elements into `parts` contiguous ranges as even as possible: (counts, starts).
pub fn partition(n: usize, parts: usize) -> (Vec<usize>, Vec<usize>) {
    let (base, extra) = (n / parts, n % parts);
    let counts: Vec<usize> = (0..parts).map(|p| base + usize::from(p < extra)).collect();
    let starts = counts.iter().scan(0, |at, &c| Some(std::mem::replace(at, *at + c))).collect();
    (counts, starts)
}

#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
/// Add `pieces` (each rank's copy of one slice of `out.len()` elements, in rank order) left to
/// right.
fn add_in_order(pieces: &[f32], out: &mut [f32]) {
    let len = out.len();
    if len == 0 {
        return;
    }
    out.copy_from_slice(&pieces[..len]);
    for piece in pieces[len..].chunks_exact(len) {
        out.iter_mut().zip(piece).for_each(|(o, &x)| *o += x);
    }
}

/// Finalise MPI after a successful command (a no-op when it was never started).
pub fn finalize() {
    imp::finalize();
}

/// After an error in a distributed job: stop every rank now (`MPI_Abort`), since the others may
/// wait forever in a collective for this one. Returns only when no job is running.
pub fn abort_job(code: i32) {
    imp::abort(code);
}

#[cfg(feature = "mpi")]
mod imp {
    use super::{add_in_order, partition, Group};
    use crate::base::error::{Error, Result};
    use mpi::collective::{CommunicatorCollectives, Root};
    use mpi::datatype::{Partition, PartitionMut};
    use mpi::environment::Universe;
    use mpi::topology::Communicator;
    use mpi::Count;
    use std::sync::Mutex;

    /// MPI lives as long as this holds the universe: `finalize` drops it (MPI_Finalize).
    static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

    fn comm() -> mpi::topology::SimpleCommunicator {
        mpi::topology::SimpleCommunicator::world()
    }

    pub fn world(launched: usize) -> Result<Group> {
        let mut u = UNIVERSE.lock().unwrap_or_else(|e| e.into_inner());
        if u.is_none() {
            // Serialized: training calls MPI from one thread at a time, but not the main
            // thread (the CLI runs on a rayon worker, util::on_worker_thread).
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
                .ok_or_else(|| Error::usage("MPI was already initialised and finalised in this process"))?;
            *u = Some(universe);
        }
        let w = comm();
        let (rank, size) = (w.rank() as usize, w.size() as usize);
        if size != launched {
            return Err(Error::usage(format!(
                "the launcher says {launched} ranks but MPI's world has {size}; is this itt linked against the \
                 MPI library of the mpirun that started it?"
            )));
        }
        Ok(Group { rank, size })
    }

    fn counts(v: &[usize]) -> Vec<Count> {
        v.iter().map(|&c| c as Count).collect()
    }

    pub fn sum_in_rank_order(g: &Group, flat: &mut [f32]) -> Result<()> {
        let p = g.size;
        let (counts_, starts) = partition(flat.len(), p);
        let mine = counts_[g.rank];
        // Slice r of every rank goes to rank r: this rank receives P copies of its own slice.
        let mut pieces = vec![0f32; mine * p];
        {
            let (c, d) = (counts(&counts_), counts(&starts));
            let send = Partition::new(&flat[..], &c[..], &d[..]);
            let rc = vec![mine as Count; p];
            let rd: Vec<Count> = (0..p).map(|r| (r * mine) as Count).collect();
            let mut recv = PartitionMut::new(&mut pieces[..], &rc[..], &rd[..]);
            comm().all_to_all_varcount_into(&send, &mut recv);
        }
        let mut sum = vec![0f32; mine];
        add_in_order(&pieces, &mut sum);
        let (c, d) = (counts(&counts_), counts(&starts));
        let mut recv = PartitionMut::new(flat, &c[..], &d[..]);
        comm().all_gather_varcount_into(&sum[..], &mut recv);
        Ok(())
    }

    pub fn all_gather_f64(g: &Group, values: &[f64]) -> Result<Vec<f64>> {
        let mut out = vec![0f64; values.len() * g.size];
        comm().all_gather_into(values, &mut out[..]);
        Ok(out)
    }

    pub fn all_gather_bytes(g: &Group, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut lens = vec![0u64; g.size];
        comm().all_gather_into(&(bytes.len() as u64), &mut lens[..]);
        let lens: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
        let starts: Vec<usize> = lens.iter().scan(0, |at, &c| Some(std::mem::replace(at, *at + c))).collect();
        let mut all = vec![0u8; lens.iter().sum()];
        {
            let (c, d) = (counts(&lens), counts(&starts));
            let mut recv = PartitionMut::new(&mut all[..], &c[..], &d[..]);
            comm().all_gather_varcount_into(bytes, &mut recv);
        }
        Ok(lens.iter().zip(&starts).map(|(&l, &s)| all[s..s + l].to_vec()).collect())
    }

    pub fn broadcast_bytes(bytes: &mut [u8]) -> Result<()> {
        comm().process_at_rank(0).broadcast_into(bytes);
        Ok(())
    }

    pub fn barrier() {
        comm().barrier();
    }

    pub fn finalize() {
        let u = UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(u);
    }

    pub fn abort(code: i32) {
        let running = UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        if running && comm().size() > 1 {
            comm().abort(code);
        }
    }
}

#[cfg(not(feature = "mpi"))]
mod imp {
    use super::Group;
    use crate::base::error::{Error, Result};

    pub fn world(launched: usize) -> Result<Group> {
        Err(Error::usage(format!(
            "started by mpirun with {launched} ranks, but this itt was built without MPI; rebuild with \
             `cargo build --release --features mpi` (needs Open MPI: apt-get install libopenmpi-dev openmpi-bin libclang-dev)"
        )))
    }

    fn unreachable_single() -> Error {
        Error::usage("a collective was called on a multi-rank group in a build without MPI")
    }

    pub fn sum_in_rank_order(_: &Group, _: &mut [f32]) -> Result<()> {
        Err(unreachable_single())
    }

    pub fn all_gather_f64(_: &Group, _: &[f64]) -> Result<Vec<f64>> {
        Err(unreachable_single())
    }

    pub fn all_gather_bytes(_: &Group, _: &[u8]) -> Result<Vec<Vec<u8>>> {
        Err(unreachable_single())
    }

    pub fn broadcast_bytes(_: &mut [u8]) -> Result<()> {
        Err(unreachable_single())
    }

    pub fn barrier() {}

    pub fn finalize() {}

    pub fn abort(_: i32) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_covers_everything_in_order() {
        for (n, p) in [(0, 3), (1, 2), (10, 3), (12, 4), (7, 1)] {
            let (c, s) = partition(n, p);
            assert_eq!(c.iter().sum::<usize>(), n);
            assert_eq!(c.iter().max().unwrap() - c.iter().min().unwrap(), usize::from(n % p != 0));
            for r in 1..p {
                assert_eq!(s[r], s[r - 1] + c[r - 1]);
            }
        }
    }

    #[test]
    fn pieces_add_left_to_right() {
        // Three ranks' copies of a 2-element slice; the sum is ((a + b) + c) element-wise.
        let (a, b, c) = (1.0e8f32, -1.0e8f32, 1.0f32);
        let pieces = [a, c, b, b, c, a];
        let mut out = [0f32; 2];
        add_in_order(&pieces, &mut out);
        assert_eq!(out, [(a + b) + c, (c + b) + a]);
    }

    #[test]
    fn a_share_is_a_contiguous_block_and_must_divide() {
        let g = Group { rank: 1, size: 2 };
        assert_eq!(g.share(4).unwrap(), 2..4);
        assert_eq!(Group::single().share(3).unwrap(), 0..3);
        let e = g.share(3).unwrap_err().to_string();
        assert!(e.contains("--grad-accum 3") && e.contains("2 ranks"), "{e}");
    }
}
