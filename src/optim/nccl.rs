//! The gradient sum over the ranks of a distributed run on GPUs through NCCL (cargo feature
//! `nccl`, DESIGN §14): every rank's flattened sums are all-gathered into one device buffer of
//! P x N floats and added in rank order on the device (((r0 + r1) + r2) + ...), the same order
//! and therefore the same bits as `Group::sum_in_rank_order` on the host, on every rank.
//!
//! The communicator is made once per run: rank 0 makes the NCCL unique id, MPI broadcasts it
//! (`Group::broadcast_bytes`), and every rank joins on the stream of its parameters' GPU, so the
//! collective is ordered with candle's kernels on that stream. cudarc loads libnccl lazily and
//! panics when it is missing; every NCCL call here is guarded and fails with a one-line error.

use crate::base::dist::Group;
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Storage, Tensor};
use cudarc::nccl::safe::{Comm, Id};
use std::panic::AssertUnwindSafe;

/// One NCCL communicator over all ranks of the group, on the stream of this rank's GPU.
pub struct NcclComm {
    comm: Comm,
}

// SAFETY: cudarc's `Comm` holds NCCL's raw communicator pointer, which makes it neither `Send`
// nor `Sync`. NCCL allows a communicator to be used from any thread as long as calls on it are
// not concurrent; this one is owned by one accumulator and only used through `&mut` of it.
unsafe impl Send for NcclComm {}

/// Run `f`, turning a panic of cudarc (a library or symbol it cannot load) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(AssertUnwindSafe(f));
    std::panic::set_hook(previous_hook);
    out.map_err(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the NCCL library refused".into());
        Error::usage(crate::base::error::one_line(format!("NCCL {what}: {why}")))
    })
}

fn nccl_error(what: &str, e: cudarc::nccl::result::NcclError) -> Error {
    Error::usage(format!("NCCL {what} failed: {:?}", e.0))
}

/// An error unless libnccl can be loaded under one of the names cudarc looks for.
fn check_library() -> Result<()> {
    let loads = |name: &str| {
        let Ok(name) = std::ffi::CString::new(name) else { return false };
        // SAFETY: dlopen with a valid C string; the handle stays open, as cudarc reopens it.
        !unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY) }.is_null()
    };
    let candidates = cudarc::get_lib_name_candidates("nccl");
    if candidates.iter().any(|c| loads(c)) {
        return Ok(());
    }
    let hint = if loads("libnccl.so.2") {
        "libnccl.so.2 is here but cudarc looks for libnccl.so: put a link libnccl.so -> libnccl.so.2 in a folder on \
         LD_LIBRARY_PATH"
    } else {
        "install NCCL (apt-get install libnccl2 libnccl-dev, or pip install nvidia-nccl-cu13) and put its lib folder \
         on LD_LIBRARY_PATH"
    };
    Err(Error::usage(format!("this itt sums gradients over the GPUs with NCCL, but libnccl cannot be loaded; {hint}")))
}

impl NcclComm {
    /// Join the group's communicator on `dev`'s stream (a collective: every rank calls it).
    pub fn new(group: &Group, dev: &CudaDevice) -> Result<Self> {
        // Rank 0 sends [ok, id...]: a rank 0 that cannot make the id stops every rank here.
        let mut msg = [0u8; 1 + 128];
        let mut mine = Ok(());
        if group.is_lead() {
            mine = check_library()
                .and_then(|()| guarded("unique id", Id::new)?.map_err(|e| nccl_error("ncclGetUniqueId", e)))
                .map(|id| {
                    msg[0] = 1;
                    for (m, &c) in msg[1..].iter_mut().zip(id.internal()) {
                        *m = c as u8;
                    }
                });
        }
        group.broadcast_bytes(&mut msg)?;
        mine?;
        if msg[0] != 1 {
            return Err(Error::usage("rank 0 could not start NCCL (its error is in its log)"));
        }
        check_library()?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (c, &m) in internal.iter_mut().zip(&msg[1..]) {
            *c = m as std::ffi::c_char;
        }
        let stream = dev.cuda_stream();
        // ncclCommInitRank joins on the calling thread's current device.
        stream.context().bind_to_thread().map_err(|e| Error::usage(format!("NCCL: cannot bind the GPU: {e:?}")))?;
        let comm =
            guarded("communicator", || Comm::from_rank(stream, group.rank(), group.size(), Id::uninit(internal)))?
                .map_err(|e| nccl_error("ncclCommInitRank", e))?;
        Ok(NcclComm { comm })
    }

    /// The sum over the ranks of every rank's `flat` (one f32 vector on this GPU, the same
    /// length on every rank), added in rank order on the device.
    pub fn sum_in_rank_order(&self, flat: &Tensor) -> Result<Tensor> {
        let candle_core::Device::Cuda(dev) = flat.device() else {
            return Err(Error::usage("the NCCL gradient sum needs tensors on a CUDA device"));
        };
        let flat = flat.flatten_all()?.contiguous()?;
        let (n, p) = (flat.elem_count(), self.comm.world_size());
        // Every rank's buffer, in rank order: P x N floats on each GPU.
        let mut gathered = dev.alloc_zeros::<f32>(n * p)?;
        {
            let (storage, layout) = flat.storage_and_layout();
            let Storage::Cuda(s) = &*storage else {
                return Err(Error::usage("the NCCL gradient sum needs tensors on a CUDA device"));
            };
            let start = layout.start_offset();
            let send = s.as_cuda_slice::<f32>()?.slice(start..start + n);
            guarded("all-gather", || self.comm.all_gather(&send, &mut gathered))?
                .map_err(|e| nccl_error("ncclAllGather", e))?;
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(gathered, dev.clone()));
        let gathered = Tensor::from_storage(storage, (p, n), BackpropOp::none(), false);
        let mut sum = gathered.get(0)?;
        for r in 1..p {
            sum = (sum + gathered.get(r)?)?;
        }
        Ok(sum)
    }
}
