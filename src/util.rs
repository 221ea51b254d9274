//! Small process-level helpers: memory readings, allocator settings, and the one way files
//! are written atomically.

use crate::error::IoContext;
use crate::Result;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// Peak resident memory of this process in MiB (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_mb() -> f64 {
    read_status_kb("VmHWM:") / 1024.0
}

/// Current resident memory in MiB (Linux `VmRSS`), 0 where unknown.
pub fn rss_mb() -> f64 {
    read_status_kb("VmRSS:") / 1024.0
}

fn read_status_kb(key: &str) -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else { return 0.0 };
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Reset the peak-RSS counter (Linux: write 5 to /proc/self/clear_refs), so that a later
/// `peak_rss_mb` measures one phase. Returns false where unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Keep freed large buffers in the heap instead of returning them to the kernel: every
/// tensor op allocates fresh buffers, and glibc's default mmap/munmap of large blocks cost
/// ~30% of a training step (docs/DESIGN.md §11). Call once at start-up.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
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
    if let (None, Some(local)) = (std::env::var_os("RAYON_NUM_THREADS"), crate::dist::launched_local_size()) {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", (cores / local).max(1).to_string());
    }
}

/// Write a new file, refusing to replace one that exists (user files are never overwritten).
pub fn write_new(path: &std::path::Path, bytes: &[u8]) -> crate::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| crate::Error::input(path, format!("cannot create: {e}")))?;
    f.write_all(bytes).map_err(|e| crate::Error::input(path, format!("cannot write: {e}")))
}

/// Write `path` atomically: into `path.tmpPID` beside it, fsync, rename over `path`, fsync the
/// folder. Readers never see a half-written file, and after a crash there is either the old
/// file or the new one. A failed write removes its temporary file.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>) -> Result<()> {
    let tmp = tmp_path(path);
    let written = (|| -> Result<()> {
        let file = File::create(&tmp).at(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w).at(&tmp)?;
        let file = w.into_inner().map_err(|e| e.into_error()).at(&tmp)?;
        file.sync_all().at(&tmp)?;
        drop(file);
        std::fs::rename(&tmp, path).at(path)
    })();
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
