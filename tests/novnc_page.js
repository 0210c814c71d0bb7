// Test page module for tests/test_novnc.py: runs the noVNC 1.3 RFB client
// that Debian ships (served from /usr/share/novnc) against our server and
// resolves with the canvas pixels once the whole first frame is on screen.
//
// noVNC has no "frame drawn" event, so two of its methods are wrapped:
// RFB._handleDataRect (a rectangle was fully decoded) and Display.flip (the
// back buffer reached the visible canvas).  The frame is complete at the
// first flip after decoded rectangles have covered every pixel; flips queued
// behind asynchronous image decodes (TightPNG) run only after those images.
//
// The encodings noVNC offers can be restricted (RFB.messages.clientEncodings
// is wrapped): `encodings` replaces its real encodings, in that order, and
// `lossless` drops its JPEG quality pseudo-encodings, which noVNC always
// sends and which make our server answer Tight with JPEG.
//
// `rawAlphaFix` works around noVNC 1.3's Raw decoder, which forces alpha 255
// at offsets counted from the start of its receive buffer instead of from
// the rectangle's pixels: with a 32bpp format whose padding byte is 0 (ours,
// like QEMU's) some pixels stay transparent.  The fix sets the alpha bytes
// of the complete lines waiting in the buffer before noVNC decodes them.
import RFB from '/core/rfb.js';
import Display from '/core/display.js';
import RawDecoder from '/core/decoders/raw.js';

const JPEG_QUALITY_FIRST = -32, JPEG_QUALITY_LAST = -23;
const TIGHT_PNG = -260;
let watch = null;       // the FrameWatch of the connection under test
let encodingRule = null;
let rawAlphaFix = false;
let openClient = null;  // the RFB left connected after a complete frame

const decodeRect = RFB.prototype._handleDataRect;
RFB.prototype._handleDataRect = function () {
    const { x, y, width, height, encoding } = this._FBU;
    const done = decodeRect.call(this);
    if (done && watch) { watch.rectDecoded(x, y, width, height, encoding); }
    return done;
};

const flip = Display.prototype.flip;
Display.prototype.flip = function (fromQueue) {
    const drawsNow = fromQueue || this._renderQ.length === 0;
    flip.call(this, fromQueue);
    if (drawsNow && watch) { watch.flipped(); }
};

const rawDecodeRect = RawDecoder.prototype.decodeRect;
RawDecoder.prototype.decodeRect = function (x, y, width, height, sock, display, depth) {
    if (rawAlphaFix && depth !== 8 && width > 0 && height > 0) {
        const linesLeft = this._lines === 0 ? height : this._lines;
        const pixels = Math.min(linesLeft, Math.floor(sock.rQlen / (width * 4))) * width;
        const queue = sock.rQ, start = sock.rQi;
        for (let i = 0; i < pixels; i++) { queue[start + i * 4 + 3] = 255; }
    }
    return rawDecodeRect.call(this, x, y, width, height, sock, display, depth);
};

const clientEncodings = RFB.messages.clientEncodings;
RFB.messages.clientEncodings = function (sock, encs) {
    if (encodingRule !== null) {
        const pseudo = encs.filter(e => e < 0 && e !== TIGHT_PNG &&
            !(encodingRule.lossless && e >= JPEG_QUALITY_FIRST && e <= JPEG_QUALITY_LAST));
        encs = (encodingRule.encodings || encs.filter(e => e >= 0 || e === TIGHT_PNG)).concat(pseudo);
    }
    if (watch) { watch.result.sentEncodings = encs.slice(); }
    return clientEncodings.call(this, sock, encs);
};

class FrameWatch {
    constructor(width, height, onComplete) {
        this.width = width;
        this.height = height;
        this.covered = new Uint8Array(width * height);
        this.missing = width * height;
        this.onComplete = onComplete;
        this.result = { rects: {}, sentEncodings: null };
    }

    rectDecoded(x, y, w, h, encoding) {
        this.result.rects[encoding] = (this.result.rects[encoding] || 0) + 1;
        const x1 = Math.min(x + w, this.width), y1 = Math.min(y + h, this.height);
        for (let row = y; row < y1; row++) {
            for (let i = row * this.width + x, end = row * this.width + x1; i < end; i++) {
                if (!this.covered[i]) { this.covered[i] = 1; this.missing--; }
            }
        }
    }

    flipped() {
        if (this.missing === 0 && this.onComplete) {
            const done = this.onComplete;
            this.onComplete = null;
            done();
        }
    }
}

function canvasBase64(canvas, width, height) {
    const rgba = canvas.getContext('2d').getImageData(0, 0, width, height).data;
    let text = '';
    for (let i = 0; i < rgba.length; i += 0x8000) {
        text += String.fromCharCode.apply(null, rgba.subarray(i, i + 0x8000));
    }
    return btoa(text);
}

// opts: {url, width, height, encodings (array or null), lossless, rawAlphaFix,
//        password, timeoutMs}
// Resolves (never rejects) with {outcome, ...}: outcome is 'frame' (with
// rgba = base64 RGBA of the canvas), 'securityfailure', 'credentialsrequired',
// 'disconnected' or 'timeout'.  After 'frame' the client stays connected
// (the canvas is still on the page) until disconnect() is called.
export function run(opts) {
    encodingRule = opts.encodings || opts.lossless
        ? { encodings: opts.encodings || null, lossless: !!opts.lossless } : null;
    rawAlphaFix = !!opts.rawAlphaFix;
    return new Promise((resolve) => {
        const target = document.getElementById('screen');
        let rfb = null;
        let finished = false;
        const finish = (outcome, extra) => {
            if (finished) { return; }
            finished = true;
            clearTimeout(timer);
            const result = Object.assign(current.result, { outcome }, extra || {});
            watch = null;
            openClient = rfb;
            if (outcome !== 'frame') { disconnect(); }
            resolve(result);
        };
        const current = new FrameWatch(opts.width, opts.height, () => {
            const canvas = target.querySelector('canvas');
            const box = canvas.getBoundingClientRect();
            finish('frame', {
                canvasWidth: canvas.width, canvasHeight: canvas.height,
                canvasBox: { x: box.left, y: box.top, width: box.width, height: box.height },
                rgba: canvasBase64(canvas, opts.width, opts.height),
            });
        });
        watch = current;
        const timer = setTimeout(() => finish('timeout', { missing: current.missing }), opts.timeoutMs);
        const options = opts.password === null ? {} : { credentials: { password: opts.password } };
        rfb = new RFB(target, opts.url, options);
        rfb.addEventListener('connect', () => { current.result.connected = true; });
        rfb.addEventListener('desktopname', (e) => { current.result.desktopName = e.detail.name; });
        rfb.addEventListener('credentialsrequired', () => finish('credentialsrequired'));
        rfb.addEventListener('securityfailure', (e) => finish('securityfailure', {
            status: e.detail.status, reason: e.detail.reason || null }));
        rfb.addEventListener('disconnect', (e) => finish('disconnected', { clean: e.detail.clean }));
    });
}

export function disconnect() {
    if (openClient) {
        try { openClient.disconnect(); } catch (e) { /* already closed */ }
        openClient = null;
    }
}
