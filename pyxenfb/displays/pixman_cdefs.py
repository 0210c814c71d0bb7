"""The libpixman-1 declarations pyxenfb calls through cffi (ABI mode: no compiler).

The source of the generated `pyxenfb/displays/_pixman_ffi.py` (scripts/gen_cffi.py), for
the same reason as xen_cdefs.py: loading must not import cffi's C parser.
tests/test_platform.py checks the two agree and that FUNCTIONS agree with
Debian's /usr/include/pixman-1/pixman.h (gcc).
"""

# In pixman.h these are enums; gcc gives an enum without negative values the
# ABI of unsigned int, which the header test asserts.  union pixman_image is
# opaque to us.
TYPES = """
typedef union pixman_image pixman_image_t;
typedef int pixman_bool_t;
typedef unsigned int pixman_op_t;
typedef unsigned int pixman_format_code_t;
"""

FUNCTIONS = """
pixman_image_t *pixman_image_create_bits(pixman_format_code_t format, int width, int height,
                                         uint32_t *bits, int rowstride_bytes);
pixman_bool_t pixman_image_unref(pixman_image_t *image);
void pixman_image_composite32(pixman_op_t op, pixman_image_t *src, pixman_image_t *mask,
                              pixman_image_t *dest, int32_t src_x, int32_t src_y,
                              int32_t mask_x, int32_t mask_y, int32_t dest_x, int32_t dest_y,
                              int32_t width, int32_t height);
"""

ALL = TYPES + FUNCTIONS
MODULE = "pyxenfb.displays._pixman_ffi"
