// One domain's console: Debian's noVNC, over this server's WebSocket relay.
// The domain's own VNC password (if any) is asked here and checked by its VNC
// server: the relay only passes bytes.
import RFB from '/novnc/core/rfb.js';

const domid = Number(location.pathname.split('/')[2]);
const status = document.getElementById('status');
const form = document.getElementById('password');
const state = { connected: false, credentialsRequired: false, disconnected: false, reason: null };
window.pyxenfbConsole = state;     // for scripts and tests

fetch('/api/domains', { cache: 'no-store' }).then(r => r.json()).then(list => {
    const d = list.find(x => x.domid === domid);
    if (d) {
        document.getElementById('title').textContent = `${d.name} (domain ${d.domid})`;
        document.title = `${d.name} — pyxenfb console`;
    }
}).catch(() => {});

const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
const rfb = new RFB(document.getElementById('screen'),
                    `${scheme}://${location.host}/domain/${domid}/websockify`);
state.rfb = rfb;
rfb.scaleViewport = true;
rfb.focusOnClick = true;
rfb.addEventListener('connect', () => {
    state.connected = true;
    status.textContent = 'connected';
    form.classList.remove('shown');
    document.getElementById('cad').disabled = false;
    rfb.focus();
});
rfb.addEventListener('credentialsrequired', () => {
    state.credentialsRequired = true;
    status.textContent = 'this console asks for its VNC password';
    form.classList.add('shown');
    document.getElementById('pw').focus();
});
rfb.addEventListener('securityfailure', (e) => {
    state.reason = e.detail.reason || `security failure ${e.detail.status}`;
    status.textContent = `refused: ${state.reason}`;
});
rfb.addEventListener('disconnect', (e) => {
    state.disconnected = true;
    state.connected = false;
    document.getElementById('cad').disabled = true;
    status.textContent = state.reason ? `refused: ${state.reason}`
        : e.detail.clean ? 'disconnected' : 'connection lost';
});
rfb.addEventListener('desktopname', (e) => { status.textContent = `connected: ${e.detail.name}`; });
form.addEventListener('submit', (e) => {
    e.preventDefault();
    rfb.sendCredentials({ password: document.getElementById('pw').value });
    form.classList.remove('shown');
    status.textContent = 'checking the password…';
});
document.getElementById('cad').addEventListener('click', () => rfb.sendCtrlAltDel());
