// The index: one card per domain, thumbnails refreshed while the page is visible.
// The list itself follows the server's long poll (/api/changes), so a created or
// destroyed domain shows up without waiting for the next thumbnail round.
const THUMB_EVERY_MS = 3000;
const grid = document.getElementById('grid');
const cards = new Map();           // domid -> {el, img, domain}
let version = -1;

function text(el, cls, value) {
    const span = document.createElement('span');
    span.className = cls;
    span.textContent = value;
    el.appendChild(span);
    return span;
}

function makeCard(d) {
    const el = document.createElement('a');
    el.className = 'card';
    el.id = `domain-${d.domid}`;
    el.dataset.domid = d.domid;
    el.href = `/domain/${d.domid}/`;
    const thumb = document.createElement('div');
    thumb.className = 'thumb';
    el.appendChild(thumb);
    const meta = document.createElement('div');
    meta.className = 'meta';
    el.appendChild(meta);
    const card = { el, thumb, meta, img: null, domain: null };
    updateCard(card, d);
    return card;
}

function updateCard(card, d) {
    const before = card.domain;
    card.domain = d;
    card.meta.replaceChildren();
    text(card.meta, 'name', d.name);
    text(card.meta, 'dim', `domain ${d.domid}`);
    if (d.width) { text(card.meta, 'dim size', `${d.width}×${d.height}`); }
    if (d.served_by) { text(card.meta, 'dim', d.served_by); }
    if (d.password) { text(card.meta, 'dim', 'password'); }
    if (before && before.password === d.password) { return; }
    if (d.password) {
        card.img = null;
        card.thumb.replaceChildren(lockIcon());
    } else {
        card.img = document.createElement('img');
        card.img.alt = d.name;
        const wait = document.createElement('span');
        wait.className = 'wait';
        wait.textContent = 'connecting…';
        card.thumb.replaceChildren(wait);
        refreshThumb(card);
    }
}

// Drawn, not an emoji: a server's browser may have no emoji font.
function lockIcon() {
    const ns = 'http://www.w3.org/2000/svg';
    const svg = document.createElementNS(ns, 'svg');
    svg.setAttribute('class', 'lock');
    svg.setAttribute('viewBox', '0 0 24 24');
    svg.setAttribute('width', '72');
    svg.setAttribute('height', '72');
    const title = document.createElementNS(ns, 'title');
    title.textContent = 'this console asks for a password';
    const shackle = document.createElementNS(ns, 'path');
    shackle.setAttribute('d', 'M7 11V7a5 5 0 0 1 10 0v4');
    shackle.setAttribute('fill', 'none');
    shackle.setAttribute('stroke', '#c9ced6');
    shackle.setAttribute('stroke-width', '2');
    const body = document.createElementNS(ns, 'rect');
    for (const [k, v] of Object.entries({ x: 4, y: 11, width: 16, height: 11, rx: 2, fill: '#c9ced6' })) {
        body.setAttribute(k, v);
    }
    svg.append(title, shackle, body);
    return svg;
}

function refreshThumb(card) {
    if (!card.img || document.visibilityState !== 'visible') { return; }
    const next = new Image();
    next.alt = card.domain.name;
    next.onload = () => {
        if (!card.img) { return; }
        card.img = next;
        card.thumb.replaceChildren(next);
    };
    next.src = `/domain/${card.domain.domid}/thumbnail.png?t=${Date.now()}`;
}

async function loadList() {
    const r = await fetch('/api/domains', { cache: 'no-store' });
    if (r.status === 401) { location.href = '/login?next=/'; return; }
    const domains = await r.json();
    const seen = new Set();
    for (const d of domains) {
        seen.add(d.domid);
        const card = cards.get(d.domid);
        if (card) { updateCard(card, d); } else { cards.set(d.domid, makeCard(d)); }
    }
    for (const [domid, card] of cards) {
        if (!seen.has(domid)) { card.el.remove(); cards.delete(domid); }
    }
    grid.replaceChildren(...[...cards.keys()].sort((a, b) => a - b).map(k => cards.get(k).el));
    document.getElementById('empty').hidden = cards.size !== 0;
    document.getElementById('status').textContent = `${cards.size} domain${cards.size === 1 ? '' : 's'}`;
    document.body.dataset.listed = [...cards.keys()].sort((a, b) => a - b).join(',');
}

async function follow() {
    for (;;) {
        try {
            const r = await fetch(`/api/changes?since=${version}`, { cache: 'no-store' });
            if (!r.ok) { throw new Error(`HTTP ${r.status}`); }
            const { version: now } = await r.json();
            if (now !== version) { version = now; await loadList(); }
        } catch (e) {
            document.getElementById('status').textContent = `server unreachable (${e.message}); retrying`;
            await new Promise(res => setTimeout(res, 3000));
        }
    }
}

setInterval(() => {
    if (document.visibilityState !== 'visible') { return; }
    for (const card of cards.values()) { refreshThumb(card); }
    loadList().catch(() => {});        // sizes become known once a thumbnail connection ran
}, THUMB_EVERY_MS);
document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible') { for (const c of cards.values()) { refreshThumb(c); } }
});
follow();
