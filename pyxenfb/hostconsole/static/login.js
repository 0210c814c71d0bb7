const q = new URLSearchParams(location.search);
if (q.get('next')) { document.getElementById('next').value = q.get('next'); }
document.getElementById('failed').hidden = !q.get('failed');
