//! The GPU store: CUDA device memory and the fatbins build.rs embedded, through cudarc.
//!
//! cudarc loads libcuda at run time, so this module builds everywhere; [`GpuStore::new`] returns
//! [`Error::NoGpu`] (never panics) where there is no driver or device, and [`Error::NoKernels`]
//! where the library was built without nvcc. Each kernel file's module is loaded once per store
//! (clones share it) on first use.

use crate::error::{Error, Result};
use crate::kernels::{FATBINS, MODULES, module_of};
use crate::params::HwLaunch;
use crate::store::{Elem, KernelParams, Store};
use cudarc::driver::sys::CUstream;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg, SyncOnDrop,
};
use std::collections::HashMap;
use std::ffi::c_void;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

/// A device buffer of `T`: memory headwise allocated (freed on drop), or memory an engine owns
/// (see [`GpuBuf::borrowed`]). The representation is private so a foreign address can only
/// enter through that `unsafe` constructor.
///
/// An owned buffer knows its context: a [`GpuStore`] of another device refuses to launch over
/// it (or copy it) with an [`Error::Invalid`] naming the argument, instead of faulting.
pub struct GpuBuf<T: Elem> {
    mem: Mem<T>,
    /// Elements; an owned zero-length buffer still holds one element, since the driver
    /// refuses empty allocations.
    len: usize,
}

enum Mem<T: Elem> {
    Owned(CudaSlice<T>),
    Borrowed(u64),
}

impl<T: Elem> GpuBuf<T> {
    /// Takes ownership of a cudarc allocation (freed when the buffer drops).
    pub fn owned(slice: CudaSlice<T>) -> GpuBuf<T> {
        GpuBuf { len: slice.len(), mem: Mem::Owned(slice) }
    }

    /// Wraps `len` elements of device memory at `ptr` that an engine owns: the raw-pointer path
    /// for engines in C/C++ (a `cudaMalloc`/`cuMemAlloc` address, as the C ABI takes it). A Rust
    /// engine holding cudarc buffers uses [`GpuStore::view`]/[`GpuStore::view_mut`] instead,
    /// which need no `unsafe`.
    ///
    /// # Safety
    /// `ptr` must be a device address in the store's context, valid for `len` elements of `T`
    /// for as long as this value (and any cache built on it) is used, and every kernel the
    /// store runs over it must be ordered with the engine's own use of the memory (pass the
    /// engine's stream to [`GpuStore::from_engine_stream`]). headwise never frees it.
    pub unsafe fn borrowed(ptr: *mut c_void, len: usize) -> GpuBuf<T> {
        GpuBuf { mem: Mem::Borrowed(ptr.addr() as u64), len }
    }

    /// The cudarc allocation, when headwise owns the memory.
    pub fn cuda_slice(&self) -> Option<&CudaSlice<T>> {
        match &self.mem {
            Mem::Owned(s) => Some(s),
            Mem::Borrowed(_) => None,
        }
    }
}

impl<T: Elem> From<CudaSlice<T>> for GpuBuf<T> {
    fn from(slice: CudaSlice<T>) -> Self {
        GpuBuf::owned(slice)
    }
}

/// A cudarc buffer (`CudaSlice`, `CudaView`, a candle tensor's storage: anything
/// [`DevicePtr`]) lent to headwise for the calls made while this lives: it derefs to a
/// [`GpuBuf`] over the same memory, used in place. Made by [`GpuStore::view`]. cudarc's stream
/// ordering stays intact: making it orders the store's stream after the buffer's last write,
/// dropping it records the store's work on the buffer (events), as any cudarc launch does.
pub struct GpuView<'a, T: Elem> {
    buf: GpuBuf<T>,
    _sync: SyncOnDrop<'a>,
}

impl<T: Elem> Deref for GpuView<'_, T> {
    type Target = GpuBuf<T>;
    fn deref(&self) -> &GpuBuf<T> {
        &self.buf
    }
}

/// A cudarc buffer lent to headwise for writing ([`DevicePtrMut`]): as [`GpuView`], also
/// mutably. Made by [`GpuStore::view_mut`].
pub struct GpuViewMut<'a, T: Elem> {
    buf: GpuBuf<T>,
    _sync: SyncOnDrop<'a>,
}

impl<T: Elem> Deref for GpuViewMut<'_, T> {
    type Target = GpuBuf<T>;
    fn deref(&self) -> &GpuBuf<T> {
        &self.buf
    }
}

impl<T: Elem> DerefMut for GpuViewMut<'_, T> {
    fn deref_mut(&mut self) -> &mut GpuBuf<T> {
        &mut self.buf
    }
}

struct Loaded {
    modules: Vec<Option<Arc<CudaModule>>>,
    functions: HashMap<&'static str, CudaFunction>,
}

/// A CUDA device and the stream headwise launches on.
#[derive(Clone)]
pub struct GpuStore {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    sm_count: usize,
    loaded: Arc<Mutex<Loaded>>,
}

impl std::fmt::Debug for GpuStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuStore").field("ordinal", &self.ctx.ordinal()).finish()
    }
}

/// Opens device `ordinal`'s primary context, or says why it can't.
fn open_context(ordinal: usize) -> Result<Arc<CudaContext>> {
    if FATBINS.iter().any(Option::is_none) {
        return Err(Error::NoKernels);
    }
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::NoGpu("the CUDA driver library (libcuda) is not installed".into()));
    }
    // CudaContext::new panics inside cudarc on some driver failures; keep that from reaching
    // the caller.
    let count = std::panic::catch_unwind(CudaContext::device_count)
        .map_err(|_| Error::NoGpu("the CUDA driver failed to initialise".into()))?
        .map_err(|e| Error::NoGpu(format!("the CUDA driver failed to initialise: {e}")))?;
    if ordinal >= count.max(0) as usize {
        return Err(Error::NoGpu(format!("device ordinal {ordinal} requested, {count} device(s) present")));
    }
    std::panic::catch_unwind(|| CudaContext::new(ordinal))
        .map_err(|_| Error::NoGpu(format!("creating a context on device {ordinal} panicked")))?
        .map_err(|e| Error::NoGpu(format!("creating a context on device {ordinal}: {e}")))
}

impl GpuStore {
    /// The primary context of device `ordinal` and a new stream on it.
    pub fn new(ordinal: usize) -> Result<GpuStore> {
        let ctx = open_context(ordinal)?;
        let stream = ctx.new_stream()?;
        GpuStore::with_stream(ctx, stream)
    }

    /// A store that launches on the engine's own cudarc stream, in that stream's context (no
    /// context or stream is created). Every operation is enqueued on it, in order with the
    /// engine's work there.
    ///
    /// ```no_run
    /// # fn main() -> headwise::Result<()> {
    /// let ctx = cudarc::driver::CudaContext::new(0)?;
    /// let engine_stream = ctx.default_stream();
    /// let store = headwise::GpuStore::from_stream(engine_stream.clone())?;
    /// assert!(std::sync::Arc::ptr_eq(store.stream(), &engine_stream));
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<GpuStore> {
        if FATBINS.iter().any(Option::is_none) {
            return Err(Error::NoKernels);
        }
        GpuStore::with_stream(stream.context().clone(), stream)
    }

    /// A store that launches on a raw stream an engine owns (the C/C++ path; a Rust engine with
    /// a cudarc stream uses [`GpuStore::from_stream`]), in device `ordinal`'s primary context
    /// (the context the CUDA runtime API uses, so engines built on the runtime share it).
    ///
    /// # Safety
    /// `stream` must be a live stream of that primary context and stay alive while the store
    /// (or a clone, or a cache built on it) is used. The engine is responsible for ordering its
    /// own work on other streams with the kernels headwise enqueues on this one.
    pub unsafe fn from_engine_stream(ordinal: usize, stream: CUstream) -> Result<GpuStore> {
        let ctx = open_context(ordinal)?;
        // SAFETY: forwarded from the caller's contract.
        let stream = unsafe { ctx.wrap_borrowed_stream(stream) };
        GpuStore::with_stream(ctx, stream)
    }

    fn with_stream(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<GpuStore> {
        let sm_count =
            ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let loaded = Loaded { modules: vec![None; MODULES.len()], functions: HashMap::new() };
        Ok(GpuStore { ctx, stream, sm_count: sm_count.max(1) as usize, loaded: Arc::new(Mutex::new(loaded)) })
    }

    /// The stream every launch of this store goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Lends a cudarc buffer of this store's context to headwise, in place: `&*view` is the
    /// `&GpuBuf<T>` any operation takes, over the same memory, for as long as the view lives.
    /// Errors (naming `field`) when the buffer belongs to another context.
    ///
    /// ```no_run
    /// # fn main() -> headwise::Result<()> {
    /// use headwise::{AttentionOptions, AttentionWorkspace, GpuStore, LayerCache, LayoutBuilder};
    /// use half::bf16;
    /// let store = GpuStore::new(0)?;
    /// let layout = LayoutBuilder::new(1, 2).headroom(64).full(0, 0, 0).full(0, 1, 0).build()?;
    /// let mut cache = LayerCache::<_, bf16>::new(&store, layout, 128)?;
    /// // The engine's own buffers: q for 2 KV heads x group 4, and the output.
    /// let q = store.stream().alloc_zeros::<bf16>(8 * 128)?;
    /// let mut out = store.stream().alloc_zeros::<bf16>(8 * 128)?;
    /// let (qv, mut ov) = (store.view("q", &q)?, store.view_mut("out", &mut out)?);
    /// cache.attention(&qv, 4, &mut ov, None, &mut AttentionWorkspace::new(), &AttentionOptions::default())?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn view<'a, T: Elem>(&'a self, field: &str, buf: &'a impl DevicePtr<T>) -> Result<GpuView<'a, T>> {
        self.check_context(field, buf.stream())?;
        let len = buf.len();
        let (ptr, sync) = buf.device_ptr(&self.stream);
        Ok(GpuView { buf: GpuBuf { mem: Mem::Borrowed(ptr), len }, _sync: sync })
    }

    /// [`GpuStore::view`] for a buffer headwise writes (outputs, a cache's K/V).
    pub fn view_mut<'a, T: Elem>(
        &'a self,
        field: &str,
        buf: &'a mut impl DevicePtrMut<T>,
    ) -> Result<GpuViewMut<'a, T>> {
        self.check_context(field, buf.stream())?;
        let len = buf.len();
        let (ptr, sync) = buf.device_ptr_mut(&self.stream);
        Ok(GpuViewMut { buf: GpuBuf { mem: Mem::Borrowed(ptr), len }, _sync: sync })
    }

    fn check_context(&self, field: &str, stream: &CudaStream) -> Result<()> {
        if stream.context().cu_ctx() == self.ctx.cu_ctx() {
            Ok(())
        } else {
            Err(Error::invalid(
                field,
                format!(
                    "a buffer of device {}'s context, the store is on device {}",
                    stream.context().ordinal(),
                    self.ctx.ordinal()
                ),
            ))
        }
    }

    /// Waits for everything queued on the store's stream.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    fn function(&self, name: &'static str) -> Result<CudaFunction> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = loaded.functions.get(name) {
            return Ok(f.clone());
        }
        let m = module_of(name).ok_or_else(|| Error::invalid("kernel", format!("unknown kernel {name}")))?;
        let module = match &loaded.modules[m] {
            Some(module) => module.clone(),
            None => {
                let bytes = FATBINS[m].ok_or(Error::NoKernels)?;
                let module = self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bytes.to_vec()))?;
                loaded.modules[m] = Some(module.clone());
                module
            }
        };
        let f = module.load_function(name)?;
        loaded.functions.insert(name, f.clone());
        Ok(f)
    }
}

impl Store for GpuStore {
    type Buf<T: Elem> = GpuBuf<T>;
    type Pins<'a> = Vec<SyncOnDrop<'a>>;

    fn upload<T: Elem>(&self, data: &[T]) -> Result<GpuBuf<T>> {
        if data.is_empty() {
            return self.zeros(0);
        }
        Ok(GpuBuf::owned(self.stream.clone_htod(data)?))
    }
    fn zeros<T: Elem>(&self, n: usize) -> Result<GpuBuf<T>> {
        let slice = self.stream.alloc_zeros::<T>(n.max(1))?;
        Ok(GpuBuf { mem: Mem::Owned(slice), len: n })
    }
    fn download<T: Elem>(&self, buf: &GpuBuf<T>) -> Result<Vec<T>> {
        self.check_buf("buf", buf)?;
        let mut out = vec![T::zeroed(); buf.len];
        if buf.len == 0 {
            return Ok(out);
        }
        match &buf.mem {
            Mem::Owned(s) => self.stream.memcpy_dtoh(s, &mut out)?,
            Mem::Borrowed(ptr) => {
                // SAFETY: the caller of GpuBuf::borrowed vouched for ptr/len; the view is
                // leaked back (never freed) before it drops.
                let view = unsafe { self.stream.upgrade_device_ptr::<T>(*ptr, buf.len) };
                let r = self.stream.memcpy_dtoh(&view, &mut out);
                view.leak();
                r?
            }
        }
        self.stream.synchronize()?;
        Ok(out)
    }
    fn overwrite<T: Elem>(&self, buf: &mut GpuBuf<T>, data: &[T]) -> Result<()> {
        self.check_buf("buf", buf)?;
        if Self::len(buf) != data.len() {
            return Err(Error::invalid(
                "data",
                format!("{} elements for a buffer of {}", data.len(), Self::len(buf)),
            ));
        }
        if data.is_empty() {
            return Ok(());
        }
        match &mut buf.mem {
            Mem::Owned(s) => self.stream.memcpy_htod(data, s)?,
            Mem::Borrowed(ptr) => {
                // SAFETY: as in download.
                let mut view = unsafe { self.stream.upgrade_device_ptr::<T>(*ptr, data.len()) };
                let r = self.stream.memcpy_htod(data, &mut view);
                view.leak();
                r?
            }
        }
        Ok(())
    }
    fn len<T: Elem>(buf: &GpuBuf<T>) -> usize {
        buf.len
    }
    fn sm_count(&self) -> usize {
        self.sm_count
    }
    fn check_buf<T: Elem>(&self, field: &str, buf: &GpuBuf<T>) -> Result<()> {
        match &buf.mem {
            // Memory is valid in the context that allocated it; headwise sets up no peer access.
            Mem::Owned(s) if s.context().cu_ctx() != self.ctx.cu_ctx() => Err(Error::invalid(
                field,
                format!(
                    "allocated on device {}, but this store launches on device {} (another context)",
                    s.context().ordinal(),
                    self.ctx.ordinal()
                ),
            )),
            // A borrowed address carries no context to compare: GpuBuf::borrowed's contract puts
            // it in the store's context.
            _ => Ok(()),
        }
    }
    fn addr<'a, T: Elem>(
        &'a self,
        field: &str,
        buf: &'a GpuBuf<T>,
        pins: &mut Vec<SyncOnDrop<'a>>,
    ) -> Result<u64> {
        self.check_buf(field, buf)?;
        Ok(match &buf.mem {
            Mem::Owned(s) => {
                let (p, guard) = s.device_ptr(&self.stream);
                pins.push(guard);
                p
            }
            Mem::Borrowed(ptr) => *ptr,
        })
    }
    fn addr_mut<'a, T: Elem>(
        &'a self,
        field: &str,
        buf: &'a mut GpuBuf<T>,
        pins: &mut Vec<SyncOnDrop<'a>>,
    ) -> Result<u64> {
        self.check_buf(field, buf)?;
        Ok(match &mut buf.mem {
            Mem::Owned(s) => {
                let (p, guard) = s.device_ptr_mut(&self.stream);
                pins.push(guard);
                p
            }
            Mem::Borrowed(ptr) => *ptr,
        })
    }
    unsafe fn launch<P: KernelParams>(&self, name: &'static str, cfg: &HwLaunch, params: &P) -> Result<()> {
        let f = self.function(name)?;
        if cfg.dyn_smem_bytes > 48 * 1024 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                cfg.dyn_smem_bytes as i32,
            )?;
        }
        let config = LaunchConfig {
            grid_dim: (cfg.grid_x, cfg.grid_y, cfg.grid_z),
            block_dim: (cfg.block_x, cfg.block_y, cfg.block_z),
            shared_mem_bytes: cfg.dyn_smem_bytes,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(params);
        // SAFETY: the kernel takes exactly one P by value (KernelParams), and the caller
        // guarantees every address and index in it is valid (Store::launch contract).
        unsafe { b.launch(config) }?;
        Ok(())
    }
}
