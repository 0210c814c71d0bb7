"""The C declarations of pyxenfb/rfb/enc_kernel.c, called through cffi (ABI mode).

The source of the generated `pyxenfb/rfb/_enc_ffi.py` (scripts/gen_cffi.py
--enc): loading the kernel must not import cffi's C parser.
tests/test_platform.py checks the two agree.
"""

FUNCTIONS = """
int pyxenfb_enc_version(void);
long pyxenfb_hextile(const uint8_t *pix, long stride, int w, int h, int bpp, uint8_t *out, long cap);
long pyxenfb_zrle_tiles(const uint8_t *pix, long stride, int w, int h, int bpp, int coff, int cb,
                        uint8_t *out, long cap);
void pyxenfb_gradient24(const uint8_t *rgb, int w, int h, uint8_t *out);
int pyxenfb_palette(const uint8_t *pix, long n, int bpp, int limit, uint32_t *pal, uint8_t *idx);
"""

ALL = FUNCTIONS
VERSION = 2        # pyxenfb_enc_version() of a library built from this source
MODULE = "pyxenfb.rfb._enc_ffi"
