/*
 * Reference VNC server for bench/bench_vs_libvncserver.py: libvncserver
 * serving one fixed picture, so pyxenfb's encoders can be timed against a C
 * implementation on identical pixels.
 *
 *   lvs_server PORT PICTURE WIDTH HEIGHT [DEFER_MS]
 *
 * PICTURE is WIDTH*HEIGHT*4 bytes of little-endian BGRX (0x00RRGGBB words), the
 * layout of a Xen guest's 32 bpp framebuffer.  Listens on 127.0.0.1:PORT
 * only, no authentication.  Prints "READY" on stdout once listening.
 *
 * DEFER_MS (default 0) is libvncserver's deferUpdateTime.  The library's
 * default of 5 ms holds every update back by 5-10 ms to coalesce changes,
 * which would be timed as encoder cost; the benchmark turns it off.
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <rfb/rfb.h>

enum { BPP = 4 };

int main(int argc, char **argv)
{
    if (argc < 5 || argc > 6) {
        fprintf(stderr, "usage: %s PORT PICTURE width height [DEFER_MS]\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    int width = atoi(argv[3]), height = atoi(argv[4]);
    int defer_ms = argc == 6 ? atoi(argv[5]) : 0;
    if (width <= 0 || height <= 0) {
        fprintf(stderr, "lvs_server: bad size %dx%d\n", width, height);
        return 2;
    }

    size_t size = (size_t)width * height * BPP;
    char *pixels = malloc(size);
    FILE *f = fopen(argv[2], "rb");
    if (!pixels || !f || fread(pixels, 1, size, f) != size) {
        fprintf(stderr, "lvs_server: cannot read %zu bytes from %s\n", size, argv[2]);
        return 1;
    }
    fclose(f);

    /* NULL argc/argv: no libvncserver command-line options are parsed. */
    rfbScreenInfoPtr screen = rfbGetScreen(NULL, NULL, width, height, 8, 3, BPP);
    if (!screen)
        return 1;
    screen->frameBuffer = pixels;
    screen->desktopName = "libvncserver bench";
    /* The library defaults to red in the low byte; our words are 0x00RRGGBB. */
    screen->serverFormat.redShift = 16;
    screen->serverFormat.greenShift = 8;
    screen->serverFormat.blueShift = 0;
    screen->port = port;
    screen->ipv6port = 0;                          /* no IPv6 listener */
    screen->listenInterface = htonl(INADDR_LOOPBACK);
    screen->deferUpdateTime = defer_ms;
    rfbInitServer(screen);
    if (screen->listenSock == RFB_INVALID_SOCKET) {
        fprintf(stderr, "lvs_server: cannot listen on 127.0.0.1:%d\n", port);
        return 1;
    }
    printf("READY\n");
    fflush(stdout);

    /* -1 means "select() for deferUpdateTime": with deferral off that would
       be a busy loop, so wait up to 100 ms instead (select wakes on input). */
    rfbRunEventLoop(screen, defer_ms > 0 ? -1 : 100000, FALSE);
    return 0;
}
