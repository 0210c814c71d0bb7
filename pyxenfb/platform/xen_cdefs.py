"""The C declarations pyxenfb calls through cffi (ABI mode: no compiler).

This is the source; `pyxenfb/platform/_xen_ffi.py` is generated from it by
scripts/gen_cffi.py (cffi's out-of-line ABI mode) so that a start of
pyqemu-dm loads only `_cffi_backend`: parsing these declarations at run time
imports cffi's C parser, which cost 4-6 s of the start-up in a TCG-emulated
dom0 (docs/real-xen.md).  tests/test_platform.py checks the two agree.
"""

# libxenevtchn.so.1 (xen/tools/include/xenevtchn.h)
EVTCHN = """
typedef struct xenevtchn_handle xenevtchn_handle;
xenevtchn_handle *xenevtchn_open(void *logger, unsigned int flags);
int xenevtchn_close(xenevtchn_handle *xce);
int xenevtchn_fd(xenevtchn_handle *xce);
int xenevtchn_notify(xenevtchn_handle *xce, uint32_t port);
int xenevtchn_bind_unbound_port(xenevtchn_handle *xce, uint32_t domid);
int xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid, uint32_t remote_port);
int xenevtchn_unbind(xenevtchn_handle *xce, uint32_t port);
int xenevtchn_pending(xenevtchn_handle *xce);
int xenevtchn_unmask(xenevtchn_handle *xce, uint32_t port);
int xenevtchn_restrict(xenevtchn_handle *xce, uint16_t domid);
"""

# libxenforeignmemory.so.1 (xen/tools/include/xenforeignmemory.h)
FOREIGNMEMORY = """
typedef struct xenforeignmemory_handle xenforeignmemory_handle;
xenforeignmemory_handle *xenforeignmemory_open(void *logger, unsigned int open_flags);
int xenforeignmemory_close(xenforeignmemory_handle *fmem);
void *xenforeignmemory_map(xenforeignmemory_handle *fmem, uint32_t dom, int prot,
                           size_t pages, const unsigned long arr[], int err[]);
int xenforeignmemory_unmap(xenforeignmemory_handle *fmem, void *addr, size_t pages);
int xenforeignmemory_restrict(xenforeignmemory_handle *fmem, uint16_t domid);
"""

# libc, for the simulated host's guest memory.  Addresses as uintptr_t (the
# same register as void * on every Linux ABI): plain ints are far cheaper
# than a cdata per page in the stitching loop.  unshare: Python 3.11's os
# lacks it (the sim toolstack's dm_restrict pre-exec, as libxl's).
LIBC = """
uintptr_t mmap(uintptr_t addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int unshare(int flags);
"""

ALL = EVTCHN + FOREIGNMEMORY + LIBC
MODULE = "pyxenfb.platform._xen_ffi"
