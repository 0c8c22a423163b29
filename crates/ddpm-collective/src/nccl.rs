//! NCCL on device memory: all-reduce, broadcast and barrier on the trainer's CUDA buffers,
//! each bounded by a timeout (feature `nccl`).
//!
//! # Loading
//!
//! Nothing is linked at build time, so a CPU host builds and runs the crate with this module
//! in it; using the backend there returns [`CollectiveError::Unavailable`] saying what is
//! missing.
//!
//! - The CUDA driver (`libcuda.so.1`) goes through cudarc's `driver` module with dynamic
//!   loading. cudarc panics when the library or a symbol is missing, so every library and
//!   symbol this module uses is checked first ([`is_culib_present`](cudarc::driver::sys::is_culib_present),
//!   then a symbol look-up); the panics cannot happen afterwards.
//! - NCCL is opened here with libloading (the loader cudarc uses), not through cudarc's
//!   `nccl::sys` functions: cudarc 0.19 looks for `libnccl.so` and a few other names but
//!   never `libnccl.so.2`, the only name that pip's `nvidia-nccl-cu13` (PyTorch's NCCL)
//!   ships, and a dlopen of one name does not find a library loaded under another. The
//!   library is [`NCCL_LIBRARY_ENV`] if set, else `libnccl.so.2`, else `libnccl.so`. When
//!   libtorch_cuda is already loaded, its `libnccl.so.2` is found by name, so training and
//!   the collectives share one NCCL. The functions are called through pointers typed with
//!   cudarc's `nccl::sys` types (`ncclUniqueId`, `ncclConfig_t`, `ncclComm_t`, the
//!   datatype and operation enums); results are read as plain integers, so a code that the
//!   bindings do not know is reported, not undefined behaviour. NCCL 2.14 or newer is needed.
//!
//! # Bounded waiting
//!
//! The communicator is non-blocking (`ncclConfig_t::blocking = 0`): `ncclCommInitRankConfig`
//! and the collectives return at once, possibly with `ncclInProgress`, and this module polls
//! `ncclCommGetAsyncError` until the call has finished or failed. A collective is then
//! followed by a CUDA event recorded on the caller's stream, polled with `cuEventQuery`
//! until the operation has run on the GPU. Every wait has a deadline (`timeout` from the
//! start of the operation); past it, or when NCCL reports an error (e.g. a peer that went
//! away), the communicator is aborted (`ncclCommAbort`, which makes NCCL's kernels on the
//! stream return) and the call fails, naming the operation, this rank and the ranks it
//! waited for. NCCL cannot tell which rank is late, and the error says so. A failed
//! communicator stays failed: build a new one (a new generation) to continue.
//!
//! # Aborting from another thread
//!
//! [`NcclComm::abort_handle`] returns a handle that other threads may call at any time,
//! also during an operation and after the communicator is dropped. The communicator pointer
//! lives in a mutex shared with the handle: the owning thread takes it only for the short
//! NCCL calls themselves (enqueueing, `ncclCommGetAsyncError`, finalize/destroy), never
//! while it sleeps between polls, and the handle takes it to call `ncclCommAbort` exactly
//! once and clear the pointer. So no NCCL call can run on a communicator that is being or
//! has been aborted (which would be a use after free), and `abort` waits at most for one
//! short NCCL call before its own `ncclCommAbort`. The owning thread checks the abort flag
//! on every poll, so an operation in flight fails within a poll interval (at most half a
//! millisecond after the abort returns) with [`CollectiveError::GroupAborted`], and every
//! later one fails at once. The CUDA event needs no lock: `cuEventQuery` is thread-safe,
//! and an aborted operation's kernels complete early. `abort` blocks for as long as
//! `ncclCommAbort` does (it joins NCCL's threads), so call it from a thread that may block.
//!
//! # Streams
//!
//! The `stream` of every call is a `cudaStream_t`/`CUstream`; null is the legacy default
//! stream, which libtorch uses unless a stream guard selects another (tch offers none, so
//! the worker passes null). The operation is ordered after the work already on that stream
//! (the backward pass that wrote the gradients), and the call returns only once it has run.

use crate::{AbortFlag, AbortHandle, Collective, CollectiveError, ReduceOp, Result};
use cudarc::driver::result::{self as cu, DriverError};
use cudarc::driver::sys as cusys;
use cudarc::nccl::sys as nsys;
use std::ffi::{c_char, c_int, c_void, CStr, CString, OsString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Bytes of an `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

/// Environment variable naming the NCCL library file to load, e.g.
/// `.../site-packages/nvidia/nccl/lib/libnccl.so.2`; without it `libnccl.so.2`, then
/// `libnccl.so`, are looked up on the library search path.
pub const NCCL_LIBRARY_ENV: &str = "DDPM_NCCL_LIBRARY";

/// The oldest NCCL this module works with: non-blocking communicators, `ncclCommFinalize`
/// and `ncclAvg`.
const MIN_NCCL_VERSION: c_int = 21400;
/// `NCCL_VERSION(2, 30, 3)`: the `ncclConfig_t` layout of cudarc's NCCL 2.30 bindings.
/// Older libraries read the prefix they know (they copy `min(size, their size)` bytes).
const CONFIG_VERSION: u32 = 23003;
/// `NCCL_API_MAGIC`.
const CONFIG_MAGIC: u32 = 0xcafe_beef;
/// `NCCL_CONFIG_UNDEF_INT`: "NCCL's default".
const UNDEF_INT: c_int = c_int::MIN;

const NCCL_SUCCESS: c_int = 0;
const NCCL_IN_PROGRESS: c_int = 7;

/// Settings of an [`NcclComm`].
#[derive(Debug, Clone)]
pub struct NcclOptions {
    /// Longest wait of any one operation (forming the communicator, each collective, and
    /// the finalization when it is dropped) before it is aborted.
    pub timeout: Duration,
    /// The coordinator's generation: names the communicator in NCCL's logs and errors.
    /// (The unique id already keeps ranks of different generations apart.)
    pub generation: u64,
    /// Checked by every wait, forming the communicator included: once set, the
    /// communicator is aborted and the operation fails with [`CollectiveError::GroupAborted`]
    /// (as through [`NcclComm::abort_handle`], which exists only once it is formed).
    pub abort: Option<Arc<AbortFlag>>,
}

impl Default for NcclOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            generation: 0,
            abort: None,
        }
    }
}

type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueIdFn = unsafe extern "C" fn(*mut nsys::ncclUniqueId) -> c_int;
type CommInitRankConfigFn = unsafe extern "C" fn(
    *mut nsys::ncclComm_t,
    c_int,
    nsys::ncclUniqueId,
    c_int,
    *mut nsys::ncclConfig_t,
) -> c_int;
type CommGetAsyncErrorFn = unsafe extern "C" fn(nsys::ncclComm_t, *mut c_int) -> c_int;
type CommFn = unsafe extern "C" fn(nsys::ncclComm_t) -> c_int;
type AllReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    nsys::ncclDataType_t,
    nsys::ncclRedOp_t,
    nsys::ncclComm_t,
    nsys::cudaStream_t,
) -> c_int;
type BroadcastFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    nsys::ncclDataType_t,
    c_int,
    nsys::ncclComm_t,
    nsys::cudaStream_t,
) -> c_int;
type GetErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;
type GetLastErrorFn = unsafe extern "C" fn(nsys::ncclComm_t) -> *const c_char;

/// The NCCL functions this module calls, from the library opened once per process.
struct NcclLib {
    /// The name or path it was opened by.
    name: String,
    /// `ncclGetVersion`'s code (e.g. 22809 for 2.28.9).
    version: c_int,
    get_unique_id: GetUniqueIdFn,
    comm_init_rank_config: CommInitRankConfigFn,
    comm_get_async_error: CommGetAsyncErrorFn,
    comm_finalize: CommFn,
    comm_destroy: CommFn,
    comm_abort: CommFn,
    all_reduce: AllReduceFn,
    broadcast: BroadcastFn,
    get_error_string: GetErrorStringFn,
    get_last_error: GetLastErrorFn,
    /// Keeps the function pointers above valid: the library is never unloaded.
    _lib: libloading::Library,
}

/// "2.28.9" from `ncclGetVersion`'s 22809 (or 2804 before 2.9).
fn version_string(code: c_int) -> String {
    if code >= 20900 {
        format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, code / 100 % 10, code % 100)
    }
}

/// A loader error with its cause (libloading's message alone is "dlopen failed"; the
/// cause is dlerror's text, e.g. "cannot open shared object file").
fn loader_error(e: &libloading::Error) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// The name of an `ncclResult_t`.
fn result_name(code: c_int) -> &'static str {
    match code {
        0 => "ncclSuccess",
        1 => "ncclUnhandledCudaError",
        2 => "ncclSystemError",
        3 => "ncclInternalError",
        4 => "ncclInvalidArgument",
        5 => "ncclInvalidUsage",
        6 => "ncclRemoteError",
        7 => "ncclInProgress",
        // 8 is ncclNumResults (a count, never returned) before NCCL 2.30, ncclTimeout from it.
        8 => "ncclTimeout (NCCL 2.30 and later)",
        _ => "an unknown ncclResult_t",
    }
}

/// Copies a C string that NCCL returned (null: empty).
///
/// # Safety
///
/// `p` is null or points to a NUL-terminated string that stays valid during the call.
unsafe fn c_string(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated by the caller's guarantee.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

impl NcclLib {
    /// The library loaded once for the process, or why it cannot be.
    fn get() -> Result<&'static NcclLib> {
        static LIB: OnceLock<std::result::Result<NcclLib, String>> = OnceLock::new();
        LIB.get_or_init(|| Self::open(std::env::var_os(NCCL_LIBRARY_ENV)))
            .as_ref()
            .map_err(|e| CollectiveError::Unavailable(e.clone()))
    }

    /// Opens `explicit` (the value of [`NCCL_LIBRARY_ENV`]) or else the usual names.
    fn open(explicit: Option<OsString>) -> std::result::Result<Self, String> {
        let names: Vec<OsString> = match &explicit {
            Some(path) => vec![path.clone()],
            None => vec!["libnccl.so.2".into(), "libnccl.so".into()],
        };
        let mut tried = Vec::new();
        for name in &names {
            // SAFETY: loading runs the library's initialisers; NCCL's only set up its own
            // state (and, like any NCCL user, we trust the library named).
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => return Self::resolve(lib, name.to_string_lossy().into_owned()),
                Err(e) => tried.push(format!("{}: {}", name.to_string_lossy(), loader_error(&e))),
            }
        }
        let how = if explicit.is_some() {
            format!("{NCCL_LIBRARY_ENV} names a file that could not be loaded")
        } else {
            format!(
                "install NCCL (e.g. pip's nvidia-nccl-cu13, which PyTorch uses) and put its lib folder on LD_LIBRARY_PATH or set {NCCL_LIBRARY_ENV} to the libnccl.so.2 file"
            )
        };
        Err(format!(
            "the NCCL library (libnccl.so.2) could not be loaded: {}; {how}, or use distributed.backend = \"tcp\"",
            tried.join("; ")
        ))
    }

    fn resolve(lib: libloading::Library, name: String) -> std::result::Result<Self, String> {
        /// Looks up one function of the type it is assigned to.
        ///
        /// # Safety
        ///
        /// `T` must be the C signature of `symbol` (the types above follow nccl.h).
        unsafe fn sym<T: Copy>(
            lib: &libloading::Library,
            lib_name: &str,
            symbol: &str,
        ) -> std::result::Result<T, String> {
            // SAFETY: the caller gives the symbol's true type.
            match unsafe { lib.get::<T>(symbol.as_bytes()) } {
                Ok(f) => Ok(*f),
                Err(e) => Err(format!(
                    "{lib_name} is not a usable NCCL library ({symbol}: {}); NCCL {} or newer is needed, or use distributed.backend = \"tcp\"",
                    loader_error(&e),
                    version_string(MIN_NCCL_VERSION)
                )),
            }
        }
        let n = name.as_str();
        // SAFETY: each type alias is the signature of the function in nccl.h (enums as
        // `int`, which is how C passes them).
        let (get_version, nccl) = unsafe {
            let get_version: GetVersionFn = sym(&lib, n, "ncclGetVersion")?;
            let nccl = NcclLib {
                name: name.clone(),
                version: 0,
                get_unique_id: sym(&lib, n, "ncclGetUniqueId")?,
                comm_init_rank_config: sym(&lib, n, "ncclCommInitRankConfig")?,
                comm_get_async_error: sym(&lib, n, "ncclCommGetAsyncError")?,
                comm_finalize: sym(&lib, n, "ncclCommFinalize")?,
                comm_destroy: sym(&lib, n, "ncclCommDestroy")?,
                comm_abort: sym(&lib, n, "ncclCommAbort")?,
                all_reduce: sym(&lib, n, "ncclAllReduce")?,
                broadcast: sym(&lib, n, "ncclBroadcast")?,
                get_error_string: sym(&lib, n, "ncclGetErrorString")?,
                get_last_error: sym(&lib, n, "ncclGetLastError")?,
                _lib: lib,
            };
            (get_version, nccl)
        };
        let mut version: c_int = 0;
        // SAFETY: `version` is a valid out-pointer; ncclGetVersion only writes it.
        let r = unsafe { get_version(&mut version) };
        if r != NCCL_SUCCESS {
            return Err(format!(
                "{name}: ncclGetVersion failed ({}); use distributed.backend = \"tcp\"",
                result_name(r)
            ));
        }
        if version < MIN_NCCL_VERSION {
            return Err(format!(
                "{name} is NCCL {}, but {} or newer is needed (non-blocking communicators); install a newer NCCL or use distributed.backend = \"tcp\"",
                version_string(version),
                version_string(MIN_NCCL_VERSION)
            ));
        }
        Ok(NcclLib { version, ..nccl })
    }

    /// An NCCL result in words: its name, NCCL's text and NCCL's last error message.
    fn describe(&self, code: c_int) -> String {
        // SAFETY: ncclGetErrorString returns a static string for any code (also unknown
        // ones); ncclGetLastError accepts a null communicator and returns its message buffer,
        // which is copied at once.
        let (text, last) = unsafe {
            (
                c_string((self.get_error_string)(code)),
                c_string((self.get_last_error)(std::ptr::null_mut())),
            )
        };
        let mut s = format!("{} ({text})", result_name(code));
        if !last.is_empty() {
            s.push_str(&format!("; NCCL's last message: {}", last.trim()));
        }
        s
    }
}

/// The CUDA driver symbols that cudarc's functions used here load (checked before the first
/// call, because cudarc panics on a missing one).
const DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDeviceGet",
    "cuDeviceGetCount",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventDestroy_v2",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemcpyHtoD_v2",
    "cuMemcpyDtoH_v2",
    "cuGetErrorName",
    "cuGetErrorString",
];

/// A CUDA driver error in words.
fn cuda_error(e: DriverError) -> String {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(text) => format!("{name} ({})", text.to_string_lossy()),
        Err(_) => name,
    }
}

/// Loads and initialises the CUDA driver once per process, or says why it cannot.
fn driver() -> Result<()> {
    static CHECKED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            // SAFETY: only tries to dlopen libcuda under cudarc's candidate names.
            if !unsafe { cusys::is_culib_present() } {
                // SAFETY: as above; this load only produces the loader's message.
                let why = match unsafe { libloading::Library::new("libcuda.so.1") } {
                    Err(e) => loader_error(&e),
                    Ok(_) => "cudarc found no libcuda under its names".into(),
                };
                return Err(format!(
                    "the CUDA driver library (libcuda.so.1) could not be loaded: {why}; it comes with the NVIDIA driver (on a host without a GPU use distributed.backend = \"tcp\")"
                ));
            }
            // SAFETY: is_culib_present just loaded the library under one of these names, so
            // culib() (which panics only when none loads) returns it.
            let lib = unsafe { cusys::culib() };
            for name in DRIVER_SYMBOLS {
                // SAFETY: a look-up only; the pointer is not used.
                if let Err(e) = unsafe { lib.get::<*const c_void>(name.as_bytes()) } {
                    return Err(format!(
                        "the CUDA driver library has no {name} ({}); the NVIDIA driver is too old",
                        loader_error(&e)
                    ));
                }
            }
            cu::init().map_err(|e| format!("cuInit failed: {}", cuda_error(e)))
        })
        .clone()
        .map_err(CollectiveError::Unavailable)
}

/// A retained primary context of one device (the one libtorch and NCCL use).
struct Device {
    ordinal: usize,
    dev: cusys::CUdevice,
    ctx: cusys::CUcontext,
}

impl Device {
    fn open(ordinal: usize) -> Result<Self> {
        driver()?;
        let unavailable = |what: &str, e: DriverError| {
            CollectiveError::Unavailable(format!(
                "CUDA device {ordinal}: {what} failed: {}",
                cuda_error(e)
            ))
        };
        let count = cu::device::get_count().map_err(|e| unavailable("cuDeviceGetCount", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(CollectiveError::Unavailable(format!(
                "CUDA device {ordinal} does not exist: the driver sees {count} device(s)"
            )));
        }
        let dev = cu::device::get(ordinal as c_int).map_err(|e| unavailable("cuDeviceGet", e))?;
        // SAFETY: `dev` came from cuDeviceGet.
        let ctx = unsafe { cu::primary_ctx::retain(dev) }
            .map_err(|e| unavailable("cuDevicePrimaryCtxRetain", e))?;
        Ok(Self { ordinal, dev, ctx })
    }

    /// Makes the device's primary context current on this thread (the thread's own
    /// context, if it had another one, comes back when the guard drops).
    fn bind(&self) -> std::result::Result<ContextGuard, String> {
        let before = cu::ctx::get_current().map_err(cuda_error)?;
        if before == Some(self.ctx) {
            return Ok(ContextGuard { restore: None });
        }
        // SAFETY: `ctx` is retained until `self` drops.
        unsafe { cu::ctx::set_current(self.ctx) }.map_err(cuda_error)?;
        Ok(ContextGuard { restore: before })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `open`.
        if let Err(e) = unsafe { cu::primary_ctx::release(self.dev) } {
            tracing::warn!(device = self.ordinal, error = %cuda_error(e), "nccl: releasing the primary context");
        }
    }
}

/// Restores the thread's previous CUDA context (none: the primary context stays current,
/// which is what the CUDA runtime itself would make current).
struct ContextGuard {
    restore: Option<cusys::CUcontext>,
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        if let Some(ctx) = self.restore {
            // SAFETY: the context was current on this thread a moment ago, so its owner
            // still holds it.
            let _ = unsafe { cu::ctx::set_current(ctx) };
        }
    }
}

/// The communicator pointer, shared between the owner and its abort handles.
struct Slot {
    /// Null once destroyed or aborted.
    comm: nsys::ncclComm_t,
    /// Why it is gone.
    released: Option<String>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; the Mutex around the Slot serialises them.
unsafe impl Send for Slot {}

/// What the owner and the abort handles share.
struct Shared {
    nccl: &'static NcclLib,
    rank: usize,
    world: usize,
    slot: Mutex<Slot>,
    abort_requested: AtomicBool,
    /// `ncclConfig_t::commName`: NCCL keeps the pointer for the communicator's life.
    name: CString,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the communicator with `end` (`ncclCommAbort` or `ncclCommDestroy`, named
    /// `name`) unless it is already gone; `why` is what later calls report. Returns whether
    /// this call ended it.
    fn release(&self, end: CommFn, name: &str, why: &str) -> bool {
        let mut slot = self.lock();
        if slot.comm.is_null() {
            return false;
        }
        let comm = std::mem::replace(&mut slot.comm, std::ptr::null_mut());
        slot.released = Some(why.to_string());
        // SAFETY: `comm` is live (non-null in the slot) and, with the lock held, no other
        // NCCL call on it is running; it is cleared from the slot, so none will.
        let r = unsafe { end(comm) };
        if r != NCCL_SUCCESS {
            tracing::warn!(rank = self.rank, result = %self.nccl.describe(r), "nccl: {name}");
        }
        true
    }

    /// Aborts the communicator unless it is already gone; `why` is what later calls report.
    fn abort_comm(&self, why: &str) {
        if self.release(self.nccl.comm_abort, "ncclCommAbort", why) {
            tracing::warn!(rank = self.rank, reason = why, "nccl: communicator aborted");
        }
    }

    /// Runs `f` on the live communicator with the lock held, or returns why it is gone.
    fn with_comm<R>(
        &self,
        f: impl FnOnce(nsys::ncclComm_t) -> R,
    ) -> std::result::Result<R, String> {
        let slot = self.lock();
        if slot.comm.is_null() {
            return Err(slot
                .released
                .clone()
                .unwrap_or_else(|| "the communicator was released".into()));
        }
        Ok(f(slot.comm))
    }

    /// `ncclCommGetAsyncError`: `Ok(true)` done, `Ok(false)` still in progress.
    fn poll(&self) -> std::result::Result<std::result::Result<bool, c_int>, String> {
        self.with_comm(|comm| {
            let mut state: c_int = NCCL_SUCCESS;
            // SAFETY: `comm` is live (checked under the lock, which is held).
            let r = unsafe { (self.nccl.comm_get_async_error)(comm, &mut state) };
            match (r, state) {
                (NCCL_SUCCESS, NCCL_SUCCESS) => Ok(true),
                (NCCL_SUCCESS, NCCL_IN_PROGRESS) => Ok(false),
                (NCCL_SUCCESS, failed) | (failed, _) => Err(failed),
            }
        })
    }
}

/// Interrupts the communicator from any thread; see the module docs for how this meets an
/// operation in flight.
impl AbortHandle for Shared {
    fn abort(&self) {
        self.abort_requested.store(true, Ordering::SeqCst);
        self.abort_comm("aborted through its AbortHandle");
    }
}

/// Waits between polls: yields for the first 100 µs (a bucket of gradients often takes
/// less), then sleeps from 10 µs doubling to 0.5 ms.
struct Backoff {
    started: Instant,
    sleep: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            sleep: Duration::from_micros(10),
        }
    }

    fn pause(&mut self) {
        if self.started.elapsed() < Duration::from_micros(100) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(self.sleep);
            self.sleep = (self.sleep * 2).min(Duration::from_micros(500));
        }
    }
}

/// The other ranks, in words: "rank 1", "ranks 0 and 2", "ranks 1-3", "ranks 0-2 and 4-63";
/// "no other rank" for a world of one.
fn peers_of(rank: usize, world: usize) -> String {
    let mut ranges = Vec::new();
    if rank > 0 {
        ranges.push((0, rank - 1));
    }
    if rank + 1 < world {
        ranges.push((rank + 1, world - 1));
    }
    let count: usize = ranges.iter().map(|(a, b)| b - a + 1).sum();
    let text: Vec<String> = ranges
        .iter()
        .flat_map(|&(a, b)| match b - a {
            0 => vec![a.to_string()],
            1 => vec![a.to_string(), b.to_string()],
            _ => vec![format!("{a}-{b}")],
        })
        .collect();
    match (count, text.as_slice()) {
        (0, _) => "no other rank".into(),
        (1, [one]) => format!("rank {one}"),
        (_, [one]) => format!("ranks {one}"),
        (_, [init @ .., last]) => format!("ranks {} and {last}", init.join(", ")),
        (_, []) => unreachable!("count > 0 has ranges"),
    }
}

/// Whether a device buffer has anything to exchange (an empty one needs no call: NCCL does
/// nothing for it either); a null address with data is the caller's bug.
fn has_data(what: &str, ptr: u64, len: usize) -> Result<bool> {
    if len > 0 && ptr == 0 {
        return Err(CollectiveError::Invalid(format!(
            "{what}: null device pointer for {len} values"
        )));
    }
    Ok(len > 0)
}

/// Refuses `NCCL_COMM_BLOCKING=1` (the variable's value `v`): NCCL lets it override
/// `ncclConfig_t::blocking`, and blocking calls could not be bounded by the timeout.
fn refuse_blocking(v: Option<OsString>) -> Result<()> {
    match v {
        Some(v) if v.to_str().map(str::trim) == Some("1") => Err(CollectiveError::Invalid(
            "NCCL_COMM_BLOCKING=1 makes NCCL's calls blocking, so the collective timeouts could not be enforced; unset it".into(),
        )),
        _ => Ok(()),
    }
}

/// `NCCL_CONFIG_INITIALIZER` of NCCL 2.30.3, non-blocking, named `name`.
fn comm_config(name: &CStr) -> nsys::ncclConfig_t {
    nsys::ncclConfig_t {
        size: std::mem::size_of::<nsys::ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: UNDEF_INT,
        trafficClass: UNDEF_INT,
        commName: name.as_ptr(),
        collnetEnable: UNDEF_INT,
        CTAPolicy: UNDEF_INT,
        shrinkShare: UNDEF_INT,
        nvlsCTAs: UNDEF_INT,
        nChannelsPerNetPeer: UNDEF_INT,
        nvlinkCentricSched: UNDEF_INT,
        graphUsageMode: UNDEF_INT,
        numRmaCtx: UNDEF_INT,
        maxP2pPeers: UNDEF_INT,
    }
}

/// One rank of an NCCL communicator on one GPU; see the module docs.
///
/// Besides the device operations ([`all_reduce_device`](Self::all_reduce_device),
/// [`broadcast_device`](Self::broadcast_device), [`barrier_device`](Self::barrier_device)),
/// it implements [`Collective`] on host slices by staging them through a device buffer on
/// the legacy default stream: meant for small host values (example counts, losses), not for
/// the gradient buffer.
pub struct NcclComm {
    shared: Arc<Shared>,
    options: NcclOptions,
    /// Reused for every operation: recorded after it on the caller's stream.
    event: cusys::CUevent,
    /// One float, for barriers.
    scratch: cusys::CUdeviceptr,
    /// Device buffer for host slices, and its length in floats (0: none yet).
    staging: (cusys::CUdeviceptr, usize),
    /// Declared last: the context outlives the event and buffers above, which `drop`
    /// frees first.
    device: Device,
}

// SAFETY: the CUDA handles (event, device memory, the retained primary context) may be used
// from any thread once the context is current there, which every method makes it; the
// communicator is behind the Mutex in `Shared`.
unsafe impl Send for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.shared.rank)
            .field("world", &self.shared.world)
            .field("device", &self.device.ordinal)
            .field("generation", &self.options.generation)
            .field("nccl", &self.shared.nccl.name)
            .finish_non_exhaustive()
    }
}

impl NcclComm {
    /// A new `ncclUniqueId`: rank 0 creates it and hands it to every rank (the coordinator's
    /// rendezvous). Needs only the NCCL library, no GPU; it starts NCCL's bootstrap listener
    /// in this process (`NCCL_SOCKET_IFNAME` chooses the interface).
    pub fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
        let nccl = NcclLib::get()?;
        let mut id = nsys::ncclUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        // SAFETY: `id` is a valid ncclUniqueId to write.
        let r = unsafe { (nccl.get_unique_id)(&mut id) };
        if r != NCCL_SUCCESS {
            return Err(CollectiveError::Unavailable(format!(
                "ncclGetUniqueId ({}, NCCL {}) failed: {}; NCCL could not set up its bootstrap socket (NCCL_SOCKET_IFNAME selects the network interface)",
                nccl.name,
                version_string(nccl.version),
                nccl.describe(r)
            )));
        }
        Ok(id.internal.map(|c| c as u8))
    }

    /// Joins the communicator of `world` ranks identified by `id` as `rank`, on CUDA device
    /// `device_ordinal`; waits for every rank, at most `options.timeout` (then the attempt
    /// is aborted and the error names the ranks waited for).
    pub fn init(
        rank: usize,
        world: usize,
        id: &[u8; UNIQUE_ID_BYTES],
        device_ordinal: usize,
        options: NcclOptions,
    ) -> Result<Self> {
        if world == 0 || rank >= world || world > c_int::MAX as usize {
            return Err(CollectiveError::Invalid(format!(
                "NCCL communicator: rank {rank} of a world of {world}"
            )));
        }
        if options.timeout.is_zero() {
            return Err(CollectiveError::Invalid(
                "NCCL communicator: the timeout must be positive".into(),
            ));
        }
        refuse_blocking(std::env::var_os("NCCL_COMM_BLOCKING"))?;
        let nccl = NcclLib::get()?;
        let device = Device::open(device_ordinal)?;
        let what = format!(
            "forming the NCCL communicator (ncclCommInitRankConfig; generation {}, {world} ranks, CUDA device {device_ordinal})",
            options.generation
        );
        let backend = |reason: String| CollectiveError::Backend {
            collective: what.clone(),
            rank,
            reason,
        };
        let bound = device
            .bind()
            .map_err(|e| backend(format!("binding the CUDA context: {e}")))?;
        let name = CString::new(format!("ddpm-generation-{}", options.generation))
            .expect("no NUL in a formatted number");
        // Resources first, so that a failure here leaves no communicator behind.
        let event = cu::event::create(cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| backend(format!("cuEventCreate: {}", cuda_error(e))))?;
        // SAFETY: the device's context is current; 4 bytes of device memory.
        let scratch = match unsafe { cu::malloc_sync(std::mem::size_of::<f32>()) } {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: created above and not used.
                let _ = unsafe { cu::event::destroy(event) };
                return Err(backend(format!("cuMemAlloc: {}", cuda_error(e))));
            }
        };
        let shared = Arc::new(Shared {
            nccl,
            rank,
            world,
            slot: Mutex::new(Slot {
                comm: std::ptr::null_mut(),
                released: Some("not formed".into()),
            }),
            abort_requested: AtomicBool::new(false),
            name,
        });
        let mut comm = NcclComm {
            shared,
            options,
            event,
            scratch,
            staging: (0, 0),
            device,
        };
        drop(bound);
        comm.join(id, &what)?;
        tracing::info!(
            rank,
            world,
            device = device_ordinal,
            generation = comm.options.generation,
            nccl = %version_string(nccl.version),
            "nccl: communicator formed"
        );
        Ok(comm)
    }

    /// `ncclCommInitRankConfig` (non-blocking) and the wait for it.
    fn join(&mut self, id: &[u8; UNIQUE_ID_BYTES], what: &str) -> Result<()> {
        let (nccl, rank, world) = (self.shared.nccl, self.shared.rank, self.shared.world);
        let _bound = self.bind(what)?;
        let deadline = Instant::now() + self.options.timeout;
        let mut config = comm_config(&self.shared.name);
        let unique = nsys::ncclUniqueId {
            internal: id.map(|b| b as c_char),
        };
        let mut raw: nsys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer, id and config (whose commName lives in `shared`, as long
        // as the communicator). rank < world <= c_int::MAX was checked.
        let r = unsafe {
            (nccl.comm_init_rank_config)(
                &mut raw,
                world as c_int,
                unique,
                rank as c_int,
                &mut config,
            )
        };
        if !raw.is_null() {
            let mut slot = self.shared.lock();
            slot.comm = raw;
            slot.released = None;
        }
        if r != NCCL_SUCCESS && r != NCCL_IN_PROGRESS {
            return Err(self.fail(
                what,
                format!("ncclCommInitRankConfig failed: {}", nccl.describe(r)),
            ));
        }
        if raw.is_null() {
            return Err(CollectiveError::Backend {
                collective: what.into(),
                rank,
                reason: "ncclCommInitRankConfig returned no communicator".into(),
            });
        }
        self.wait_nccl(what, deadline, Instant::now())
    }

    /// Polls `ncclCommGetAsyncError` until the last call on the communicator is done.
    fn wait_nccl(&self, what: &str, deadline: Instant, started: Instant) -> Result<()> {
        let mut backoff = Backoff::new();
        loop {
            match self.shared.poll() {
                Ok(Ok(true)) => return Ok(()),
                Ok(Ok(false)) => {}
                Ok(Err(code)) => return Err(self.nccl_failed(what, code)),
                Err(gone) => return Err(self.gone(what, gone)),
            }
            self.check_deadline(what, deadline, started)?;
            backoff.pause();
        }
    }

    /// Fails when an abort was asked for (before or during the operation) or the deadline
    /// has passed (aborting then).
    fn check_deadline(&self, what: &str, deadline: Instant, started: Instant) -> Result<()> {
        if self.shared.abort_requested.load(Ordering::SeqCst)
            || self.options.abort.as_ref().is_some_and(|f| f.is_set())
        {
            self.shared.abort_comm("aborted through its AbortHandle");
            return Err(self.aborted(what));
        }
        if Instant::now() >= deadline {
            let waited = started.elapsed();
            self.shared.abort_comm(&format!(
                "{what} timed out after {waited:?}; the communicator was aborted"
            ));
            return Err(CollectiveError::GroupTimeout {
                collective: what.into(),
                rank: self.shared.rank,
                peers: self.peers(),
                waited,
            });
        }
        Ok(())
    }

    fn peers(&self) -> String {
        peers_of(self.shared.rank, self.shared.world)
    }

    fn aborted(&self, what: &str) -> CollectiveError {
        CollectiveError::GroupAborted {
            collective: what.into(),
            rank: self.shared.rank,
            peers: self.peers(),
        }
    }

    /// The communicator was released before or during `what`.
    fn gone(&self, what: &str, why: String) -> CollectiveError {
        if self.shared.abort_requested.load(Ordering::SeqCst) {
            return self.aborted(what);
        }
        CollectiveError::Backend {
            collective: what.into(),
            rank: self.shared.rank,
            reason: format!(
                "the communicator is no longer usable ({why}); form a new one (a new generation)"
            ),
        }
    }

    /// `what` failed for `reason`: abort the communicator and say so.
    fn fail(&self, what: &str, reason: String) -> CollectiveError {
        let reason = format!("{reason}; the communicator was aborted");
        self.shared.abort_comm(&format!("{what} failed: {reason}"));
        CollectiveError::Backend {
            collective: what.into(),
            rank: self.shared.rank,
            reason,
        }
    }

    /// NCCL reported `code` during `what`: abort and say so.
    fn nccl_failed(&self, what: &str, code: c_int) -> CollectiveError {
        let described = self.shared.nccl.describe(code);
        let hint = if code == 6 {
            format!(
                " (a peer failed or went away; NCCL does not say which of {})",
                self.peers()
            )
        } else {
            String::new()
        };
        self.fail(what, format!("NCCL reported {described}{hint}"))
    }

    /// Makes the device's context current for the rest of an operation.
    fn bind(&self, what: &str) -> Result<ContextGuard> {
        self.device.bind().map_err(|e| CollectiveError::Backend {
            collective: what.into(),
            rank: self.shared.rank,
            reason: format!(
                "binding the CUDA context of device {}: {e}",
                self.device.ordinal
            ),
        })
    }

    /// Enqueues an operation with `enqueue`, then waits until it has run on `stream`.
    fn run(
        &self,
        what: &str,
        stream: cusys::CUstream,
        enqueue: impl FnOnce(&NcclLib, nsys::ncclComm_t) -> c_int,
    ) -> Result<()> {
        let started = Instant::now();
        let deadline = started + self.options.timeout;
        self.check_deadline(what, deadline, started)?;
        let _bound = self.bind(what)?;
        let r = self
            .shared
            .with_comm(|comm| enqueue(self.shared.nccl, comm))
            .map_err(|gone| self.gone(what, gone))?;
        match r {
            NCCL_SUCCESS => {}
            // Enqueued by NCCL's own thread (e.g. while it connects to the peers): the
            // kernel is on the stream only once the communicator is no longer in progress.
            NCCL_IN_PROGRESS => self.wait_nccl(what, deadline, started)?,
            code => return Err(self.nccl_failed(what, code)),
        }
        // SAFETY: the event belongs to this device's context, which is current; the stream
        // is the caller's (valid by the contract of the public functions).
        if let Err(e) = unsafe { cu::event::record(self.event, stream) } {
            let reason = format!(
                "cuEventRecord on the caller's stream failed: {}",
                cuda_error(e)
            );
            return Err(self.fail(what, reason));
        }
        let mut backoff = Backoff::new();
        loop {
            // SAFETY: the event is live until `self` drops.
            match unsafe { cu::event::query(self.event) } {
                Ok(()) => return Ok(()),
                Err(DriverError(cusys::CUresult::CUDA_ERROR_NOT_READY)) => {}
                Err(e) => {
                    let reason = format!(
                        "CUDA reported {} while this rank waited for {}",
                        cuda_error(e),
                        self.peers()
                    );
                    return Err(self.fail(what, reason));
                }
            }
            match self.shared.poll() {
                Ok(Ok(_)) => {}
                Ok(Err(code)) => return Err(self.nccl_failed(what, code)),
                Err(gone) => return Err(self.gone(what, gone)),
            }
            self.check_deadline(what, deadline, started)?;
            backoff.pause();
        }
    }

    /// Sums (or averages) `len` float32 values at device address `ptr` across the ranks, in
    /// place, on `stream` (null: the legacy default stream); returns once the result is in
    /// `ptr`, or fails within the timeout. `what` names the call in errors (e.g. "gradient
    /// bucket 2/7 at step 140"). After an error the communicator is aborted and the buffer's
    /// contents are undefined.
    ///
    /// # Safety
    ///
    /// `ptr` must be device memory of this communicator's device (or memory it can access)
    /// holding `len` float32 values, not used by anything else until the call returns;
    /// `stream` must be null or a live stream of this device's primary context (the one
    /// libtorch uses).
    pub unsafe fn all_reduce_device(
        &mut self,
        ptr: u64,
        len: usize,
        stream: *mut c_void,
        op: ReduceOp,
        what: &str,
    ) -> Result<()> {
        let what = format!("all_reduce {what}");
        if !has_data(&what, ptr, len)? {
            return Ok(());
        }
        let nccl_op = match op {
            ReduceOp::Sum => nsys::ncclRedOp_t::ncclSum,
            ReduceOp::Avg => nsys::ncclRedOp_t::ncclAvg,
        };
        self.run(&what, stream.cast(), |nccl, comm| {
            let buf = ptr as *mut c_void;
            // SAFETY: in place on the caller's buffer of `len` floats (the caller's
            // contract); `comm` is live (under the lock).
            unsafe {
                (nccl.all_reduce)(
                    buf,
                    buf,
                    len,
                    nsys::ncclDataType_t::ncclFloat32,
                    nccl_op,
                    comm,
                    stream.cast(),
                )
            }
        })
    }

    /// Copies rank `root`'s `len` float32 values at device address `ptr` into every rank's
    /// `ptr`, on `stream`; returns once they are there, or fails within the timeout.
    ///
    /// # Safety
    ///
    /// As for [`all_reduce_device`](Self::all_reduce_device).
    pub unsafe fn broadcast_device(
        &mut self,
        ptr: u64,
        len: usize,
        root: usize,
        stream: *mut c_void,
        what: &str,
    ) -> Result<()> {
        let what = format!("broadcast {what}");
        if root >= self.shared.world {
            return Err(CollectiveError::Invalid(format!(
                "{what}: root {root} of a world of {}",
                self.shared.world
            )));
        }
        if !has_data(&what, ptr, len)? {
            return Ok(());
        }
        self.run(&what, stream.cast(), |nccl, comm| {
            let buf = ptr as *mut c_void;
            // SAFETY: in place on the caller's buffer (the caller's contract); root < world.
            unsafe {
                (nccl.broadcast)(
                    buf,
                    buf,
                    len,
                    nsys::ncclDataType_t::ncclFloat32,
                    root as c_int,
                    comm,
                    stream.cast(),
                )
            }
        })
    }

    /// Returns once every rank has called it (an all-reduce of one float on a scratch
    /// buffer, on `stream`), or fails within the timeout.
    ///
    /// # Safety
    ///
    /// `stream` must be null or a live stream of this device's primary context.
    pub unsafe fn barrier_device(&mut self, stream: *mut c_void, what: &str) -> Result<()> {
        let what = format!("barrier {what}");
        let scratch = self.scratch;
        self.run(&what, stream.cast(), |nccl, comm| {
            let buf = scratch as *mut c_void;
            // SAFETY: the scratch float is this communicator's own; `comm` is live.
            unsafe {
                (nccl.all_reduce)(
                    buf,
                    buf,
                    1,
                    nsys::ncclDataType_t::ncclFloat32,
                    nsys::ncclRedOp_t::ncclSum,
                    comm,
                    stream.cast(),
                )
            }
        })
    }

    /// The CUDA device ordinal.
    pub fn device_ordinal(&self) -> usize {
        self.device.ordinal
    }

    /// The loaded NCCL's version, e.g. "2.28.9".
    pub fn nccl_version(&self) -> String {
        version_string(self.shared.nccl.version)
    }

    /// A device buffer of at least `len` floats for host slices.
    fn staging(&mut self, len: usize, what: &str) -> Result<cusys::CUdeviceptr> {
        if self.staging.1 >= len {
            return Ok(self.staging.0);
        }
        let _bound = self.bind(what)?;
        if self.staging.1 > 0 {
            // SAFETY: allocated below by an earlier call; no operation uses it now.
            let _ = unsafe { cu::free_sync(self.staging.0) };
            self.staging = (0, 0);
        }
        // SAFETY: the device's context is current.
        let p = unsafe { cu::malloc_sync(len * std::mem::size_of::<f32>()) }.map_err(|e| {
            CollectiveError::Backend {
                collective: what.into(),
                rank: self.shared.rank,
                reason: format!(
                    "allocating {len} floats of device memory for a host buffer: {}",
                    cuda_error(e)
                ),
            }
        })?;
        self.staging = (p, len);
        Ok(p)
    }

    /// Runs `op` on a device copy of `buf` on the legacy default stream, copying the result
    /// back; `what` names the operation in errors of the copies.
    fn staged(
        &mut self,
        buf: &mut [f32],
        what: &str,
        op: impl FnOnce(&mut Self, u64) -> Result<()>,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let dev = self.staging(buf.len(), what)?;
        let rank = self.shared.rank;
        let copy_failed = |dir: &str, e: DriverError| CollectiveError::Backend {
            collective: what.into(),
            rank,
            reason: format!("copying the host buffer {dir}: {}", cuda_error(e)),
        };
        {
            let _bound = self.bind(what)?;
            // SAFETY: `dev` holds at least buf.len() floats; the synchronous copy is ordered
            // on the legacy default stream, before the operation.
            unsafe { cu::memcpy_htod_sync(dev, buf) }
                .map_err(|e| copy_failed("to the device", e))?;
        }
        op(self, dev)?;
        let _bound = self.bind(what)?;
        // SAFETY: as above; the operation has completed on the legacy stream.
        unsafe { cu::memcpy_dtoh_sync(buf, dev) }.map_err(|e| copy_failed("back to the host", e))
    }
}

impl Collective for NcclComm {
    fn rank(&self) -> usize {
        self.shared.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp, what: &str) -> Result<()> {
        let len = buf.len();
        self.staged(buf, &format!("all_reduce {what}"), |comm, dev| {
            // SAFETY: `dev` is this communicator's staging buffer of >= len floats, on the
            // legacy default stream (null).
            unsafe { comm.all_reduce_device(dev, len, std::ptr::null_mut(), op, what) }
        })
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize, what: &str) -> Result<()> {
        let len = buf.len();
        self.staged(buf, &format!("broadcast {what}"), |comm, dev| {
            // SAFETY: as in all_reduce.
            unsafe { comm.broadcast_device(dev, len, root, std::ptr::null_mut(), what) }
        })
    }

    fn barrier(&mut self, what: &str) -> Result<()> {
        // SAFETY: the legacy default stream.
        unsafe { self.barrier_device(std::ptr::null_mut(), what) }
    }

    fn abort_handle(&self) -> Arc<dyn AbortHandle> {
        self.shared.clone()
    }
}

impl Drop for NcclComm {
    /// Finalizes and destroys a healthy communicator (bounded by the timeout, then aborted);
    /// aborts one that failed. Frees the event and buffers and releases the context.
    fn drop(&mut self) {
        let bound = self.device.bind();
        let nccl = self.shared.nccl;
        let what = "finalizing the NCCL communicator (ncclCommFinalize)";
        let finalized = self.shared.with_comm(|comm| {
            // SAFETY: `comm` is live (under the lock).
            unsafe { (nccl.comm_finalize)(comm) }
        });
        match finalized {
            Err(_) => {} // already aborted or never formed
            Ok(r) if r == NCCL_SUCCESS || r == NCCL_IN_PROGRESS => {
                let started = Instant::now();
                match self.wait_nccl(what, started + self.options.timeout, started) {
                    Ok(()) => {
                        self.shared
                            .release(nccl.comm_destroy, "ncclCommDestroy", "destroyed");
                    }
                    // wait_nccl aborted it (timeout or error).
                    Err(e) => tracing::warn!(error = %e, "nccl: finalizing failed"),
                }
            }
            Ok(r) => {
                let why = format!("ncclCommFinalize failed: {}", nccl.describe(r));
                self.shared.abort_comm(&why);
            }
        }
        if bound.is_ok() {
            // SAFETY: every operation has completed or been aborted; nothing else uses
            // these, and the context is current.
            unsafe {
                if self.staging.1 > 0 {
                    let _ = cu::free_sync(self.staging.0);
                }
                let _ = cu::free_sync(self.scratch);
                let _ = cu::event::destroy(self.event);
            }
        }
        drop(bound);
        // `device` drops after this, releasing the primary context.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether NCCL can be loaded here, decided without this module's loader.
    fn nccl_loadable() -> bool {
        let names: Vec<OsString> = match std::env::var_os(NCCL_LIBRARY_ENV) {
            Some(p) => vec![p],
            None => vec!["libnccl.so.2".into(), "libnccl.so".into()],
        };
        // SAFETY: only probes whether the library loads (a GPU host's NCCL).
        names
            .iter()
            .any(|n| unsafe { libloading::Library::new(n) }.is_ok())
    }

    #[test]
    fn unique_id_and_init_name_a_missing_nccl_or_give_an_id() {
        if nccl_loadable() {
            // A host with NCCL: an id needs no GPU.
            let id = NcclComm::unique_id().unwrap();
            assert_eq!(id.len(), UNIQUE_ID_BYTES);
            assert!(id.iter().any(|&b| b != 0), "an all-zero ncclUniqueId");
            return;
        }
        let err = NcclComm::unique_id().unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CollectiveError::Unavailable(_)), "{msg}");
        assert!(
            msg.contains("the NCCL library (libnccl.so.2) could not be loaded")
                && msg.contains("distributed.backend = \"tcp\""),
            "{msg}"
        );
        if std::env::var_os(NCCL_LIBRARY_ENV).is_none() {
            assert!(
                msg.contains("libnccl.so.2:") && msg.contains(NCCL_LIBRARY_ENV),
                "{msg}"
            );
        }
        // Forming a communicator fails the same way, before touching CUDA: no panic.
        let err =
            NcclComm::init(0, 1, &[7; UNIQUE_ID_BYTES], 0, NcclOptions::default()).unwrap_err();
        assert_eq!(err.to_string(), msg);
    }

    #[test]
    fn a_file_that_is_not_nccl_is_refused_naming_it() {
        // Any loadable library without NCCL's symbols; the C library is always there.
        let err = match NcclLib::open(Some("libc.so.6".into())) {
            Ok(_) => panic!("libc loaded as NCCL"),
            Err(e) => e,
        };
        assert!(
            err.contains("libc.so.6 is not a usable NCCL library")
                && err.contains("ncclGetVersion")
                && err.contains("distributed.backend = \"tcp\""),
            "{err}"
        );
        let err = match NcclLib::open(Some("/nonexistent/libnccl.so.2".into())) {
            Ok(_) => panic!("a missing file loaded"),
            Err(e) => e,
        };
        assert!(
            err.contains("/nonexistent/libnccl.so.2:")
                && err.contains(&format!("{NCCL_LIBRARY_ENV} names a file")),
            "{err}"
        );
    }

    #[test]
    fn the_driver_check_names_a_missing_libcuda_or_initialises() {
        // SAFETY: only probes whether the library loads.
        let loadable = ["libcuda.so.1", "libcuda.so"]
            .into_iter()
            .any(|n| unsafe { libloading::Library::new(n) }.is_ok());
        match driver() {
            Ok(()) => assert!(
                loadable,
                "the driver initialised without a loadable libcuda"
            ),
            Err(e) => {
                let msg = e.to_string();
                if loadable {
                    // A driver without a usable GPU (e.g. a CPU host with the library).
                    assert!(msg.contains("cuInit failed"), "{msg}");
                } else {
                    assert!(
                        msg.contains("the CUDA driver library (libcuda.so.1) could not be loaded")
                            && msg.contains("distributed.backend = \"tcp\""),
                        "{msg}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_ranks_and_timeouts_are_refused_before_loading_anything() {
        let id = [0u8; UNIQUE_ID_BYTES];
        for (rank, world) in [(0, 0), (2, 2), (5, 1)] {
            let err = NcclComm::init(rank, world, &id, 0, NcclOptions::default()).unwrap_err();
            assert!(
                matches!(err, CollectiveError::Invalid(_))
                    && err
                        .to_string()
                        .contains(&format!("rank {rank} of a world of {world}")),
                "{err}"
            );
        }
        let o = NcclOptions {
            timeout: Duration::ZERO,
            generation: 1,
            abort: None,
        };
        let err = NcclComm::init(0, 1, &id, 0, o).unwrap_err();
        assert!(
            err.to_string().contains("timeout must be positive"),
            "{err}"
        );
    }

    #[test]
    fn blocking_nccl_calls_are_refused() {
        let err = refuse_blocking(Some("1".into())).unwrap_err();
        assert!(err.to_string().contains("NCCL_COMM_BLOCKING=1"), "{err}");
        for ok in [None, Some("0".into()), Some("".into())] {
            refuse_blocking(ok).unwrap();
        }
    }

    #[test]
    fn empty_buffers_need_no_call_and_null_ones_with_data_are_refused() {
        assert!(!has_data("all_reduce x", 0, 0).unwrap());
        assert!(!has_data("all_reduce x", 4096, 0).unwrap());
        assert!(has_data("all_reduce x", 4096, 3).unwrap());
        let err = has_data("all_reduce bucket 1", 0, 3).unwrap_err();
        assert_eq!(
            err.to_string(),
            "all_reduce bucket 1: null device pointer for 3 values"
        );
    }

    #[test]
    fn peers_are_named_compactly() {
        assert_eq!(peers_of(0, 1), "no other rank");
        assert_eq!(peers_of(0, 2), "rank 1");
        assert_eq!(peers_of(1, 2), "rank 0");
        assert_eq!(peers_of(1, 3), "ranks 0 and 2");
        assert_eq!(peers_of(0, 3), "ranks 1 and 2");
        assert_eq!(peers_of(0, 4), "ranks 1-3");
        assert_eq!(peers_of(2, 4), "ranks 0, 1 and 3");
        assert_eq!(peers_of(3, 64), "ranks 0-2 and 4-63");
        assert_eq!(peers_of(63, 64), "ranks 0-62");
        assert_eq!(peers_of(1, 64), "ranks 0 and 2-63");
    }

    #[test]
    fn the_config_is_nccls_initializer_but_non_blocking() {
        let name = CString::new("ddpm-generation-3").unwrap();
        let c = comm_config(&name);
        assert_eq!(c.size, std::mem::size_of::<nsys::ncclConfig_t>());
        // size, magic, version, 15 ints and 2 pointers (NCCL 2.30.3's struct), padded to 8.
        assert_eq!(
            c.size,
            (8 + 4 + 4 + 15 * 4 + 2 * 8usize).next_multiple_of(8)
        );
        assert_eq!((c.magic, c.version, c.blocking), (0xcafebeef, 23003, 0));
        assert_eq!(version_string(c.version as c_int), "2.30.3");
        for v in [
            c.cgaClusterSize,
            c.minCTAs,
            c.maxCTAs,
            c.splitShare,
            c.trafficClass,
            c.collnetEnable,
            c.CTAPolicy,
            c.shrinkShare,
            c.nvlsCTAs,
            c.nChannelsPerNetPeer,
            c.nvlinkCentricSched,
            c.graphUsageMode,
            c.numRmaCtx,
            c.maxP2pPeers,
        ] {
            assert_eq!(v, c_int::MIN);
        }
        assert!(c.netName.is_null());
        assert_eq!(c.commName, name.as_ptr());
    }

    #[test]
    fn versions_and_results_read_as_nccl_writes_them() {
        assert_eq!(version_string(22809), "2.28.9");
        assert_eq!(version_string(21400), "2.14.0");
        assert_eq!(version_string(2804), "2.8.4");
        assert_eq!(result_name(6), "ncclRemoteError");
        assert_eq!(result_name(NCCL_IN_PROGRESS), "ncclInProgress");
        assert_eq!(result_name(42), "an unknown ncclResult_t");
    }
}
