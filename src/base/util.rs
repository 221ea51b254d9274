//! Small process-level helpers: memory readings, allocator settings, and the one way files
//! are written atomically.

use crate::base::error::{Error, IoContext, Result};
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// Peak resident memory of this process in MiB (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_mb() -> f64 {
    read_status_kb("VmHWM:") / 1024.0
}

/// This process's memory on transparent huge pages now, in MiB (Linux `AnonHugePages` of
/// `/proc/self/smaps_rollup`), and the kernel's policy for them (`always`, `madvise`, `never`;
/// "unknown" elsewhere): what decides whether `base::alloc`'s advice takes effect (decode speed
/// depends on it, docs/PERFORMANCE.md "Huge pages").
pub fn huge_pages() -> (f64, String) {
    let mb = std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("AnonHugePages:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0);
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|s| Some(s.split('[').nth(1)?.split(']').next()?.to_string()))
        .unwrap_or_else(|| "unknown".into());
    (mb, mode)
}

fn read_status_kb(key: &str) -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else { return 0.0 };
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Keep freed large buffers in the heap instead of returning them to the kernel: every
/// tensor op allocates fresh buffers, and glibc's default mmap/munmap of large blocks cost
/// ~30% of a training step (docs/DESIGN.md §11). Call once at start-up.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes two integers and only changes glibc's allocation thresholds; it is
    // called at start-up (from `main`, before other threads allocate) and cannot fail unsafely.
    unsafe {
        // M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1 (malloc.h).
        libc::mallopt(-3, 1 << 30);
        libc::mallopt(-1, 1 << 30);
    }
}

/// Hand freed heap memory back to the system. `tune_allocator` keeps freed memory in the
/// process (trim threshold 1 GiB) so training steps reuse it; after freeing something large
/// for good (a served model's f32 weight copies) this returns it.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap; no pointers are handed over.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Run `f` on a worker of a rayon pool with the default number of threads, so that every
/// parallel region (matrix products, fused kernels, the optimiser) is forked from a pool thread
/// that takes part in the work, instead of from the main thread, which would hand the work to
/// the pool and sleep until woken. On 2 cores that saves a third thread's sleep and wake-up per
/// region, hundreds of times a training step (docs/PERFORMANCE.md). The workers get the main
/// thread's 8 MiB stack (backward passes recurse over the graph). Falls back to the calling
/// thread if the pool cannot be built.
pub fn on_worker_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match rayon::ThreadPoolBuilder::new().stack_size(8 << 20).build() {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

/// Run candle's element-wise ops on the calling thread unless `CANDLE_NUM_THREADS` is set.
/// candle 0.11 splits element-wise ops of >= 64K elements over its own thread pool, and the
/// caller spin-waits for the other threads; on 2 shared cores that spinning cost more than the
/// second core gained (training step of preset `small`: ~27% less CPU and ~15-30% more tokens/s
/// without it, docs/PERFORMANCE.md). Matrix products and the fused kernels in `ops` keep using
/// every core. Call once at start-up, before any tensor op.
///
/// Under `mpirun`, the ranks on one machine share its cores: unless RAYON_NUM_THREADS says
/// otherwise, each takes cores / ranks-on-this-machine threads (DESIGN §14).
pub fn tune_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if let (None, Some(local)) = (std::env::var_os("RAYON_NUM_THREADS"), crate::base::dist::launched_local_size()) {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", (cores / local).max(1).to_string());
    }
}

/// Write a new file, refusing to replace one that exists (user files are never overwritten).
pub fn write_new(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::input(path, format!("cannot create: {e}")))?;
    f.write_all(bytes).map_err(|e| Error::input(path, format!("cannot write: {e}")))
}

/// Write `path` atomically: into `path.tmpPID` beside it, fsync, rename over `path`, fsync the
/// folder. Readers never see a half-written file, and after a crash (or a full disk) there is
/// either the old file or the new one. A failed write removes its temporary file.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>) -> Result<()> {
    write_atomic_via(path, |tmp| {
        let file = File::create(tmp).at(tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w).at(tmp)?;
        w.into_inner().map_err(|e| e.into_error()).at(tmp)?;
        Ok(())
    })
}

/// [`write_atomic`] for writers that create the file themselves from a path (a library's
/// `save(path)`): `write` fills the temporary path, which is then synced and renamed.
pub fn write_atomic_via(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = tmp_path(path);
    let written = write(&tmp).and_then(|()| {
        File::open(&tmp).and_then(|f| f.sync_all()).at(&tmp)?;
        std::fs::rename(&tmp, path).at(path)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => sync_dir(dir),
        None => sync_dir(Path::new(".")),
    }
}

/// `path` with `.tmp` and this process's id appended (`train.bin` -> `train.bin.tmp1234`), so
/// two processes writing the same file never share a temporary one.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".tmp{}", std::process::id()));
    PathBuf::from(s)
}

/// fsync a folder, so that files created or renamed in it survive a crash (Unix; elsewhere a
/// folder cannot be opened for this and nothing is done).
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).at(dir)?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The compute device named on the command line (`--device`): `cpu`, `cuda` (GPU 0) or
/// `cuda:N` (DESIGN §15). Only parses; [`open_device`] makes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("unknown device '{s}' (use cpu, cuda or cuda:N, e.g. cuda:0)");
        match s.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Parse and open a `--device` value: one place for every command.
pub fn parse_device(s: &str) -> Result<candle_core::Device> {
    open_device(s.parse().map_err(Error::usage)?)
}

/// Open the device. A CUDA device needs a build with the `cuda` feature and an NVIDIA driver;
/// either missing is a one-line error, never a panic.
pub fn open_device(spec: DeviceSpec) -> Result<candle_core::Device> {
    match spec {
        DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
        DeviceSpec::Cuda(ordinal) => open_cuda(ordinal),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> Result<candle_core::Device> {
    Err(Error::usage(
        "this itt was built without CUDA; rebuild with `cargo build --release --features cuda` (scripts/build_cuda.sh)",
    ))
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<candle_core::Device> {
    // cudarc loads the driver library lazily and panics when it is absent, so look for it
    // first; the panic guard below covers whatever else it refuses with a panic.
    let driver_found = ["libcuda.so.1", "libcuda.so"].iter().any(|name| {
        let name = std::ffi::CString::new(*name).expect("no NUL in a library name");
        // SAFETY: dlopen with a valid C string; the handle is kept open, as cudarc reopens it.
        !unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY) }.is_null()
    });
    if !driver_found {
        return Err(Error::usage(format!(
            "cuda:{ordinal}: no NVIDIA driver here (libcuda.so.1 cannot be loaded); use --device cpu or run on a machine with an NVIDIA GPU"
        )));
    }
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| candle_core::Device::new_cuda(ordinal));
    std::panic::set_hook(previous_hook);
    match opened {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => Err(Error::usage(format!("cannot open GPU cuda:{ordinal}: {e}"))),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the CUDA library refused".into());
            Err(Error::usage(format!("cannot open GPU cuda:{ordinal}: {why}")))
        }
    }
}

/// Wait for the device's queued work (a GPU runs asynchronously), so timings measure it.
pub fn synchronize(device: &candle_core::Device) -> Result<()> {
    Ok(device.synchronize()?)
}

/// Memory in use on a CUDA device in MiB (`cuMemGetInfo`: total - free, every process's),
/// `None` on the CPU or a build without CUDA.
pub fn gpu_memory_used_mb(device: &candle_core::Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        // The device's context is current on this thread once it has run anything.
        let _ = d.cuda_stream().context().bind_to_thread();
        return candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
            .ok()
            .map(|(free, total)| (total - free) as f64 / (1 << 20) as f64);
    }
    let _ = device;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_bad_ones_say_what_to_use() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        for bad in ["cuda:x", "tpu", "", "cuda:", "CUDA:-1"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains("use cpu, cuda or cuda:N") && !e.contains('\n'), "{bad}: {e}");
        }
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("tpu").is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_one_line_error() {
        let e = parse_device("cuda:0").unwrap_err().to_string();
        assert!(e.contains("built without CUDA") && e.contains("--features cuda") && !e.contains('\n'), "{e}");
    }
}
