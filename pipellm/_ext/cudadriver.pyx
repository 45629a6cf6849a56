# distutils: language = c++
# cython: language_level=3
"""The CUDA driver calls of the cuda device's copy path, through cuda-bindings' ``cydriver``
with the GIL released: asynchronous copies between (pinned) host memory and device memory
on a stream, events recorded behind them (a bounce slot is reused only once the event of
the copy reading it has completed), page-locking host memory, and the primary context
(the one PyTorch uses) made current on a thread.

Built only where cuda-bindings' ``.pxd`` files and the CUDA headers (``cuda.h``: the
``nvidia-cuda-runtime`` wheel, ``$CUDA_HOME`` or ``/usr/local/cuda``) are present; see
setup.py. Without a driver every call raises :class:`~pipellm.DeviceUnavailableError`
saying why.
"""

from libc.stdint cimport uintptr_t
from cuda.bindings cimport cydriver

from pipellm.errors import ArgumentError, DeviceError, DeviceUnavailableError


cdef str _name(cydriver.CUresult result):
    cdef const char* text = NULL
    try:
        if cydriver.cuGetErrorName(result, &text) == cydriver.CUDA_SUCCESS and text != NULL:
            return text.decode()
    except Exception:
        pass
    return f"CUresult {<int>result}"


cdef int _check(cydriver.CUresult result, str what) except -1:
    if result == cydriver.CUDA_SUCCESS:
        return 0
    if result in (cydriver.CUDA_ERROR_NO_DEVICE, cydriver.CUDA_ERROR_STUB_LIBRARY,
                  cydriver.CUDA_ERROR_DEVICE_UNAVAILABLE, cydriver.CUDA_ERROR_NOT_INITIALIZED):
        raise DeviceUnavailableError(f"{what} failed: {_name(result)}")
    raise DeviceError(f"{what} failed: {_name(result)}")


cdef inline Exception _unavailable(exc):
    return DeviceUnavailableError(f"the CUDA driver could not be loaded ({type(exc).__name__}: {exc})")


cdef bint _ready = False


cdef int _ensure() except -1:
    """Every call below goes through here first: the driver is loaded once, and a machine
    without one gets DeviceUnavailableError, never a loader's exception."""
    if not _ready:
        init()
    return 0


def init() -> None:
    """Load and initialise the driver. Raises DeviceUnavailableError (with the reason) on a
    machine without one."""
    global _ready
    cdef cydriver.CUresult result
    try:
        with nogil:
            result = cydriver.cuInit(0)
    except Exception as exc:  # cuda-bindings raises while it looks for libcuda
        raise _unavailable(exc) from None
    _check(result, "cuInit")
    _ready = True


def device_count() -> int:
    cdef int count = 0
    _ensure()
    _check(cydriver.cuDeviceGetCount(&count), "cuDeviceGetCount")
    return count


_primary = {}  # device id -> its primary context, retained once for the process


def use_primary_context(int device_id) -> int:
    """Make device ``device_id``'s primary context current on the calling thread (each
    thread that issues copies needs it); returns the context handle. The context is
    retained once per process (the driver releases it at exit)."""
    cdef cydriver.CUdevice device
    cdef cydriver.CUcontext context
    _ensure()
    if device_id not in _primary:
        _check(cydriver.cuDeviceGet(&device, device_id), f"cuDeviceGet({device_id})")
        _check(cydriver.cuDevicePrimaryCtxRetain(&context, device), "cuDevicePrimaryCtxRetain")
        _primary[device_id] = <uintptr_t>context
    context = <cydriver.CUcontext><uintptr_t>_primary[device_id]
    _check(cydriver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    return <uintptr_t>context


cdef class Stream:
    """A non-blocking stream (it does not wait for the legacy default stream)."""

    cdef cydriver.CUstream _handle
    cdef bint _live

    def __cinit__(self):
        self._live = False
        _ensure()
        _check(cydriver.cuStreamCreate(&self._handle, cydriver.CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        self._live = True

    @property
    def handle(self) -> int:
        """The CUstream as an int (for torch.cuda.ExternalStream)."""
        return <uintptr_t>self._handle

    def synchronize(self) -> None:
        cdef cydriver.CUresult result
        self._check_live()
        with nogil:
            result = cydriver.cuStreamSynchronize(self._handle)
        _check(result, "cuStreamSynchronize")

    cdef int _check_live(self) except -1:
        if not self._live:
            raise ArgumentError("the stream was closed")
        return 0

    def close(self) -> None:
        if self._live:
            self._live = False
            _check(cydriver.cuStreamDestroy(self._handle), "cuStreamDestroy")

    def __dealloc__(self):
        if self._live:
            cydriver.cuStreamDestroy(self._handle)


cdef class Event:
    """Recorded behind work on a stream; ``query()`` says whether that work has finished."""

    cdef cydriver.CUevent _handle
    cdef bint _live

    def __cinit__(self):
        self._live = False
        _ensure()
        _check(cydriver.cuEventCreate(&self._handle, cydriver.CU_EVENT_DISABLE_TIMING), "cuEventCreate")
        self._live = True

    cdef int _check_live(self) except -1:
        if not self._live:
            raise ArgumentError("the event was closed")
        return 0

    def record(self, Stream stream not None) -> None:
        self._check_live()
        stream._check_live()
        _check(cydriver.cuEventRecord(self._handle, stream._handle), "cuEventRecord")

    def query(self) -> bool:
        """True once everything recorded before the event has completed."""
        self._check_live()
        cdef cydriver.CUresult result = cydriver.cuEventQuery(self._handle)
        if result == cydriver.CUDA_ERROR_NOT_READY:
            return False
        _check(result, "cuEventQuery")
        return True

    def synchronize(self) -> None:
        cdef cydriver.CUresult result
        self._check_live()
        with nogil:
            result = cydriver.cuEventSynchronize(self._handle)
        _check(result, "cuEventSynchronize")

    def close(self) -> None:
        if self._live:
            self._live = False
            _check(cydriver.cuEventDestroy(self._handle), "cuEventDestroy")

    def __dealloc__(self):
        if self._live:
            cydriver.cuEventDestroy(self._handle)


def copy_to_device(uintptr_t dst, const unsigned char[::1] src not None, Stream stream not None) -> None:
    """Queue a copy of host bytes ``src`` to device address ``dst`` on ``stream`` (truly
    asynchronous only from page-locked memory: keep ``src`` alive and unchanged until an
    event recorded after it has completed)."""
    cdef size_t n = src.shape[0]
    cdef cydriver.CUresult result
    stream._check_live()  # a live stream: the driver is loaded
    if n == 0:
        return
    with nogil:
        result = cydriver.cuMemcpyHtoDAsync(<cydriver.CUdeviceptr>dst, &src[0], n, stream._handle)
    _check(result, "cuMemcpyHtoDAsync")


def copy_to_host(unsigned char[::1] dst not None, uintptr_t src, Stream stream not None) -> None:
    """Queue a copy of ``len(dst)`` bytes at device address ``src`` into host ``dst``
    (keep ``dst`` alive, and read it only, once an event recorded after it completed)."""
    cdef size_t n = dst.shape[0]
    cdef cydriver.CUresult result
    stream._check_live()
    if n == 0:
        return
    with nogil:
        result = cydriver.cuMemcpyDtoHAsync(&dst[0], <cydriver.CUdeviceptr>src, n, stream._handle)
    _check(result, "cuMemcpyDtoHAsync")


def register_host(uintptr_t address, size_t nbytes) -> None:
    """Page-lock ``nbytes`` of host memory at ``address`` for DMA (cuMemHostRegister)."""
    cdef cydriver.CUresult result
    _ensure()
    with nogil:
        result = cydriver.cuMemHostRegister(<void*>address, nbytes, 0)
    _check(result, "cuMemHostRegister")


def unregister_host(uintptr_t address) -> None:
    _ensure()
    _check(cydriver.cuMemHostUnregister(<void*>address), "cuMemHostUnregister")


# -- the driver table of the hot path (pipellm._ext.gpupath): the real driver ----------------
from libc.stdint cimport uint64_t
from cpython.pycapsule cimport PyCapsule_New
from pipellm._ext.drivertable cimport DriverTable


cdef int _t_error_name(int result, const char** text) noexcept nogil:
    return <int>cydriver.cuGetErrorName(<cydriver.CUresult>result, text)


cdef int _t_context_current(int device) noexcept nogil:
    cdef cydriver.CUdevice handle
    cdef cydriver.CUcontext context
    cdef cydriver.CUresult result = cydriver.cuDeviceGet(&handle, device)
    if result != cydriver.CUDA_SUCCESS:
        return <int>result
    result = cydriver.cuDevicePrimaryCtxRetain(&context, handle)  # retained once per thread: the
    if result != cydriver.CUDA_SUCCESS:                          # driver counts, releases at exit
        return <int>result
    return <int>cydriver.cuCtxSetCurrent(context)


cdef int _t_mem_alloc(uint64_t* address, size_t nbytes) noexcept nogil:
    cdef cydriver.CUdeviceptr pointer = 0
    cdef cydriver.CUresult result = cydriver.cuMemAlloc(&pointer, nbytes)
    address[0] = <uint64_t>pointer
    return <int>result


cdef int _t_mem_free(uint64_t address) noexcept nogil:
    return <int>cydriver.cuMemFree(<cydriver.CUdeviceptr>address)


cdef int _t_host_alloc(void** pointer, size_t nbytes) noexcept nogil:
    # cuMemHostAlloc, not malloc + cuMemHostRegister: registration is refused in H100
    # confidential-computing mode (error 801 at every size), allocation is not
    return <int>cydriver.cuMemHostAlloc(pointer, nbytes, 0)


cdef int _t_host_free(void* pointer) noexcept nogil:
    return <int>cydriver.cuMemFreeHost(pointer)


cdef int _t_stream_create(void** stream) noexcept nogil:
    return <int>cydriver.cuStreamCreate(<cydriver.CUstream*>stream, cydriver.CU_STREAM_NON_BLOCKING)


cdef int _t_stream_destroy(void* stream) noexcept nogil:
    return <int>cydriver.cuStreamDestroy(<cydriver.CUstream>stream)


cdef int _t_stream_wait_event(void* stream, void* event) noexcept nogil:
    return <int>cydriver.cuStreamWaitEvent(<cydriver.CUstream>stream, <cydriver.CUevent>event, 0)


cdef int _t_stream_synchronize(void* stream) noexcept nogil:
    return <int>cydriver.cuStreamSynchronize(<cydriver.CUstream>stream)


cdef int _t_event_create(void** event) noexcept nogil:
    return <int>cydriver.cuEventCreate(<cydriver.CUevent*>event, cydriver.CU_EVENT_DISABLE_TIMING)


cdef int _t_event_destroy(void* event) noexcept nogil:
    return <int>cydriver.cuEventDestroy(<cydriver.CUevent>event)


cdef int _t_event_record(void* event, void* stream) noexcept nogil:
    return <int>cydriver.cuEventRecord(<cydriver.CUevent>event, <cydriver.CUstream>stream)


cdef int _t_event_query(void* event) noexcept nogil:
    return <int>cydriver.cuEventQuery(<cydriver.CUevent>event)


cdef int _t_event_synchronize(void* event) noexcept nogil:
    return <int>cydriver.cuEventSynchronize(<cydriver.CUevent>event)


cdef int _t_copy_htod(uint64_t dst, const void* src, size_t nbytes, void* stream) noexcept nogil:
    return <int>cydriver.cuMemcpyHtoDAsync(<cydriver.CUdeviceptr>dst, src, nbytes, <cydriver.CUstream>stream)


cdef int _t_copy_dtoh(void* dst, uint64_t src, size_t nbytes, void* stream) noexcept nogil:
    return <int>cydriver.cuMemcpyDtoHAsync(dst, <cydriver.CUdeviceptr>src, nbytes, <cydriver.CUstream>stream)


cdef int _t_copy_dtod(uint64_t dst, uint64_t src, size_t nbytes, void* stream) noexcept nogil:
    return <int>cydriver.cuMemcpyDtoDAsync(<cydriver.CUdeviceptr>dst, <cydriver.CUdeviceptr>src, nbytes,
                                           <cydriver.CUstream>stream)


cdef int _t_module_load(void** module, const void* image) noexcept nogil:
    return <int>cydriver.cuModuleLoadData(<cydriver.CUmodule*>module, image)


cdef int _t_module_function(void** function, void* module, const char* name) noexcept nogil:
    return <int>cydriver.cuModuleGetFunction(<cydriver.CUfunction*>function, <cydriver.CUmodule>module, name)


cdef int _t_launch(void* function, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                   unsigned int by, unsigned int bz, unsigned int shared, void* stream,
                   void** params) noexcept nogil:
    return <int>cydriver.cuLaunchKernel(<cydriver.CUfunction>function, gx, gy, gz, bx, by, bz, shared,
                                        <cydriver.CUstream>stream, params, NULL)


cdef DriverTable _table


def table():
    """The real driver's table for pipellm._ext.gpupath (a capsule named
    "pipellm.DriverTable"). Loads the driver first: DeviceUnavailableError without one."""
    _ensure()
    _table.error_name = _t_error_name
    _table.context_current = _t_context_current
    _table.mem_alloc = _t_mem_alloc
    _table.mem_free = _t_mem_free
    _table.host_alloc = _t_host_alloc
    _table.host_free = _t_host_free
    _table.stream_create = _t_stream_create
    _table.stream_destroy = _t_stream_destroy
    _table.stream_wait_event = _t_stream_wait_event
    _table.stream_synchronize = _t_stream_synchronize
    _table.event_create = _t_event_create
    _table.event_destroy = _t_event_destroy
    _table.event_record = _t_event_record
    _table.event_query = _t_event_query
    _table.event_synchronize = _t_event_synchronize
    _table.copy_htod = _t_copy_htod
    _table.copy_dtoh = _t_copy_dtoh
    _table.copy_dtod = _t_copy_dtod
    _table.module_load = _t_module_load
    _table.module_function = _t_module_function
    _table.launch = _t_launch
    return PyCapsule_New(&_table, b"pipellm.DriverTable", NULL)
