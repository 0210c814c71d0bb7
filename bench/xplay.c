/* xplay: play a ring of precomputed frames on an X display, putting only each
 * frame's changed rectangles (XPutImage), as the reference guest sends them.
 * The frames file is written by pyxenfb/sim/content.py write_frames_file()
 * (the guest's own generators), so the X side shows the guest's pixels.
 *
 * usage: xplay --file FRAMES [--display :N] [--fps F] [--seconds S]
 * Prints "xplay: ready WxH frames=N" once, then "xplay: ... fps=F" every 2 s
 * on stderr (the same lines as ../shared/bench/xanim.c).
 * Build: gcc -O2 -o xplay xplay.c -lX11
 */
#include <X11/Xlib.h>
#include <X11/Xutil.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint32_t u32(const unsigned char *p) {
    return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24;
}

int main(int argc, char **argv) {
    const char *dname = NULL, *path = NULL;
    double fps = 0, seconds = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--display") && i + 1 < argc) dname = argv[++i];
        else if (!strcmp(argv[i], "--file") && i + 1 < argc) path = argv[++i];
        else if (!strcmp(argv[i], "--fps") && i + 1 < argc) fps = atof(argv[++i]);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc) seconds = atof(argv[++i]);
        else path = NULL, i = argc;
    }
    if (!path) {
        fprintf(stderr, "usage: %s --file FRAMES [--display :N] [--fps F] [--seconds S]\n", argv[0]);
        return 2;
    }
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || st.st_size < 24) { perror(path); return 1; }
    unsigned char *map = mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) { perror("mmap"); return 1; }
    if (memcmp(map, "PXBPLAY1", 8)) { fprintf(stderr, "xplay: %s is no frames file\n", path); return 1; }
    uint32_t W = u32(map + 8), H = u32(map + 12), n = u32(map + 16), maxr = u32(map + 20);
    size_t head = 24 + (size_t)n * (4 + 16 * (size_t)maxr);
    size_t data = (head + 4095) / 4096 * 4096, frame = (size_t)W * H * 4;
    if (!W || !H || !n || maxr > 64 || data + n * frame != (size_t)st.st_size) {
        fprintf(stderr, "xplay: %s: inconsistent header\n", path);
        return 1;
    }
    Display *dpy = XOpenDisplay(dname);
    if (!dpy) { fprintf(stderr, "xplay: cannot open display\n"); return 1; }
    int scr = DefaultScreen(dpy);
    Window root = RootWindow(dpy, scr);
    Visual *vis = DefaultVisual(dpy, scr);
    if (DefaultDepth(dpy, scr) != 24 || vis->red_mask != 0xff0000 || vis->blue_mask != 0xff ||
        (uint32_t)DisplayWidth(dpy, scr) != W || (uint32_t)DisplayHeight(dpy, scr) != H) {
        fprintf(stderr, "xplay: need a %ux%u 24-bit 0xRRGGBB TrueColor screen\n", W, H);
        return 1;
    }
    GC gc = DefaultGC(dpy, scr);
    XImage **img = calloc(n, sizeof *img);
    for (uint32_t f = 0; f < n; f++) {
        /* the image reads the mapped file; it is never destroyed (that would free() it) */
        img[f] = XCreateImage(dpy, vis, 24, ZPixmap, 0, (char *)map + data + f * frame, W, H, 32, W * 4);
        if (!img[f]) { fprintf(stderr, "xplay: XCreateImage failed\n"); return 1; }
    }
    XPutImage(dpy, root, gc, img[0], 0, 0, 0, 0, W, H);   /* the first frame whole */
    XSync(dpy, False);
    fprintf(stderr, "xplay: ready %ux%u frames=%u\n", W, H, n);
    double t0 = now(), tlast = t0, next = t0;
    long k = 1, klast = 0;
    for (;;) {
        uint32_t f = k % n;
        const unsigned char *r = map + 24 + (size_t)f * (4 + 16 * (size_t)maxr);
        uint32_t nr = u32(r);
        for (uint32_t i = 0; i < nr && i < maxr; i++) {
            const unsigned char *q = r + 4 + 16 * i;
            uint32_t x = u32(q), y = u32(q + 4), w = u32(q + 8), h = u32(q + 12);
            if (x < W && y < H && w <= W - x && h <= H - y && w && h)
                XPutImage(dpy, root, gc, img[f], x, y, x, y, w, h);
        }
        XSync(dpy, False);
        k++;
        double t = now();
        if (t - tlast >= 2.0) {
            fprintf(stderr, "xplay: %ux%u frames=%u fps=%.1f\n", W, H, n, (k - klast) / (t - tlast));
            tlast = t; klast = k;
        }
        if (seconds > 0 && t - t0 >= seconds) break;
        if (fps > 0) {
            next += 1.0 / fps;
            double s = next - now();
            if (s > 0) {
                struct timespec ts = { (time_t)s, (long)((s - (time_t)s) * 1e9) };
                nanosleep(&ts, NULL);
            } else if (s < -1.0) next = now();
        }
    }
    XCloseDisplay(dpy);
    return 0;
}
