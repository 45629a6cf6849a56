# cython: language_level=3
"""The CUDA driver calls the cuda device's hot path makes, as a table of C function
pointers. ``cudadriver`` fills it with the real driver (cuda-bindings' ``cydriver``);
``gpupath`` fills it with trampolines into a Python fake (``pipellm.devices.fakedriver``)
so CI runs the same C path without a GPU. The types are the driver's, reduced to what
the C ABI passes (handles are pointers, device addresses 64-bit): no CUDA header is
needed to build against this table.

Every function returns the driver's CUresult (0: success). ``event_query`` returns
``NOT_READY`` (600) while the event's work is pending.
"""

from libc.stdint cimport uint64_t

cdef enum:
    SUCCESS = 0
    NOT_READY = 600
    FAKE_RAISED = 999   # a fake's callback raised: gpupath re-raises its exception

ctypedef struct DriverTable:
    int (*error_name)(int result, const char** text) noexcept nogil
    int (*context_current)(int device) noexcept nogil
    int (*mem_alloc)(uint64_t* address, size_t nbytes) noexcept nogil
    int (*mem_free)(uint64_t address) noexcept nogil
    int (*host_alloc)(void** pointer, size_t nbytes) noexcept nogil        # page-locked
    int (*host_free)(void* pointer) noexcept nogil
    int (*stream_create)(void** stream) noexcept nogil                    # non-blocking
    int (*stream_destroy)(void* stream) noexcept nogil
    int (*stream_wait_event)(void* stream, void* event) noexcept nogil
    int (*stream_synchronize)(void* stream) noexcept nogil
    int (*event_create)(void** event) noexcept nogil                      # no timing
    int (*event_destroy)(void* event) noexcept nogil
    int (*event_record)(void* event, void* stream) noexcept nogil
    int (*event_query)(void* event) noexcept nogil
    int (*event_synchronize)(void* event) noexcept nogil
    int (*copy_htod)(uint64_t dst, const void* src, size_t nbytes, void* stream) noexcept nogil
    int (*copy_dtoh)(void* dst, uint64_t src, size_t nbytes, void* stream) noexcept nogil
    int (*copy_dtod)(uint64_t dst, uint64_t src, size_t nbytes, void* stream) noexcept nogil
    int (*module_load)(void** module, const void* image) noexcept nogil
    int (*module_function)(void** function, void* module, const char* name) noexcept nogil
    int (*launch)(void* function, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                  unsigned int by, unsigned int bz, unsigned int shared, void* stream,
                  void** params) noexcept nogil
