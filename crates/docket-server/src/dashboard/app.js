// Docket dashboard: plain JavaScript, no build step, no dependencies.
// Every call goes to this server's JSON API with the operator's bearer
// token (kept in sessionStorage). Text is always set with textContent; the
// only markup inserted is the server's own SVG, parsed as SVG.
'use strict';

(() => {
  const TOKEN_KEY = 'docket.token';
  const $ = (id) => document.getElementById(id);
  const page = document.body.dataset.page;
  let skew = 0; // server clock minus ours, in ms

  // ---------- small helpers ----------

  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'text') e.textContent = v;
      else if (k === 'class') e.className = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  const nowMs = () => Date.now() + skew;
  const ms = (t) => (typeof t === 'number' ? t : Date.parse(t));

  function human(d) {
    const neg = d < 0;
    let a = Math.abs(Math.round(d));
    let s;
    if (a < 1000) s = a + 'ms';
    else if (a < 10000) s = (a / 1000).toFixed(1) + 's';
    else if (a < 60000) s = Math.floor(a / 1000) + 's';
    else if (a < 3600000) s = Math.floor(a / 60000) + 'm ' + Math.floor((a % 60000) / 1000) + 's';
    else if (a < 86400000) s = Math.floor(a / 3600000) + 'h ' + Math.floor((a % 3600000) / 60000) + 'm';
    else s = Math.floor(a / 86400000) + 'd ' + Math.floor((a % 86400000) / 3600000) + 'h';
    return (neg ? '-' : '') + s;
  }

  const ago = (t) => human(nowMs() - ms(t)) + ' ago';

  function utc(t) {
    if (t === null || t === undefined) return '—';
    const d = new Date(ms(t));
    if (isNaN(d)) return String(t);
    return d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
  }

  function json(v) {
    return v === undefined || v === null ? '—' : JSON.stringify(v, null, 2);
  }

  function statusBadge(status, retryScheduled) {
    return el('span', {
      class: 'status s-' + status + (retryScheduled ? ' s-retry' : ''),
      'data-status': status,
      text: retryScheduled ? 'retry scheduled' : status,
    });
  }

  function sevBadge(sev, text) {
    return el('span', { class: 'sev sev-' + sev, 'data-severity': sev, text: text || sev });
  }

  function toast(msg, isError) {
    const t = $('toast');
    if (!t) return;
    t.textContent = msg;
    t.className = 'toast' + (isError ? ' bad' : '');
    t.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { t.hidden = true; }, 4000);
  }

  function putSvg(box, text) {
    const doc = new DOMParser().parseFromString(text, 'image/svg+xml');
    const root = doc.documentElement;
    if (root.nodeName.toLowerCase() !== 'svg') {
      box.replaceChildren(el('p', { class: 'error', text: 'The chart could not be drawn.' }));
      return;
    }
    box.replaceChildren(document.importNode(root, true));
  }

  function debounce(fn, wait) {
    let t = null;
    return (...args) => {
      clearTimeout(t);
      t = setTimeout(() => fn(...args), wait);
    };
  }

  function markReady(what) {
    const main = $('main');
    main.dataset.ready = what;
    main.dataset.renders = String(Number(main.dataset.renders || 0) + 1);
  }

  // ---------- the API ----------

  class ApiError extends Error {
    constructor(status, message, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  // `none`: the server runs without authentication
  // (--insecure-dev-no-auth), so there is no token to ask for.
  const NO_AUTH = document.body.dataset.auth === 'none';

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function authHeaders(t) {
    return NO_AUTH ? {} : { Authorization: 'Bearer ' + t };
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    const next = location.pathname + location.search;
    const q = new URLSearchParams();
    if (next !== '/signin') q.set('next', next);
    if (message) q.set('msg', message);
    location.href = '/signin?' + q.toString();
  }

  async function api(path, opts) {
    const o = opts || {};
    const headers = Object.assign(authHeaders(o.token || token()), { Accept: 'application/json' });
    let body;
    if (o.body !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(o.body);
    }
    const res = await fetch(path, { method: o.method || 'GET', headers, body });
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (res.status === 401 && !o.token) {
      signOut((data && data.error && data.error.message) || 'Sign in again.');
      throw new ApiError(401, 'unauthorized', data);
    }
    if (!res.ok) {
      const msg = data && data.error && data.error.message
        ? data.error.message
        : res.status + ' ' + res.statusText;
      throw new ApiError(res.status, msg, data);
    }
    return data;
  }

  // Server-sent events over fetch (EventSource cannot send a bearer
  // token). Resumes with Last-Event-ID after a dropped connection.
  function liveEvents(query, onEvent) {
    let lastId = null;
    let stopped = false;
    let ctrl = null;
    const live = $('live');
    const setLive = (on) => { if (live) live.classList.toggle('on', on); };
    (async () => {
      let backoff = 1000;
      while (!stopped) {
        ctrl = new AbortController();
        try {
          const headers = Object.assign(authHeaders(token()), { Accept: 'text/event-stream' });
          if (lastId) headers['Last-Event-ID'] = lastId;
          const res = await fetch('/api/events' + (query ? '?' + query : ''), { headers, signal: ctrl.signal });
          if (res.status === 401) { signOut('Sign in again.'); return; }
          if (!res.ok || !res.body) throw new Error('events: ' + res.status);
          setLive(true);
          backoff = 1000;
          const reader = res.body.getReader();
          const dec = new TextDecoder();
          let buf = '';
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buf += dec.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
            let i;
            while ((i = buf.indexOf('\n\n')) >= 0) {
              const chunk = buf.slice(0, i);
              buf = buf.slice(i + 2);
              let data = '';
              for (const line of chunk.split('\n')) {
                if (line.startsWith('id:')) lastId = line.slice(3).trim();
                else if (line.startsWith('data:')) data += line.slice(5).trim();
              }
              if (data) {
                try { onEvent(JSON.parse(data)); } catch (_) { /* not an event */ }
              }
            }
          }
        } catch (_) {
          if (stopped) return;
        }
        setLive(false);
        await new Promise((r) => setTimeout(r, backoff));
        backoff = Math.min(backoff * 2, 15000);
      }
    })();
    const stop = () => { stopped = true; if (ctrl) ctrl.abort(); };
    // A page kept in the back/forward cache would hold its stream open,
    // and a browser allows only a few connections per server: close it
    // when the page is hidden, start afresh if the page comes back.
    window.addEventListener('pagehide', stop);
    window.addEventListener('pageshow', (e) => { if (e.persisted) location.reload(); });
    return stop;
  }

  function setAttentionCount(n) {
    for (const id of ['attention-count', 'attention-badge']) {
      const e = $(id);
      if (e) {
        e.textContent = String(n);
        e.classList.toggle('hot', n > 0);
      }
    }
  }

  // Jobs of the tenant (`GET /api/jobs`): paused or not, their queue.
  let jobState = new Map();

  async function loadJobs() {
    const j = await api('/api/jobs');
    jobState = new Map(j.jobs.map((x) => [x.name, x]));
    return j.jobs;
  }

  function pausedBadge(job) {
    const j = jobState.get(job);
    return j && j.paused
      ? el('span', { class: 'paused-badge', 'data-paused': job, title: 'This job is paused: its runs are queued but not claimed', text: 'paused' })
      : null;
  }

  // The operator dialog of the layout (pause/resume, bulk actions): a
  // title, a text, fields, a comment, then `run(comment)`, which may keep
  // the dialog open to show results.
  let opCurrent = null;

  function openOp(o) {
    const d = $('op-dialog');
    opCurrent = o;
    $('op-title').textContent = o.title;
    $('op-text').textContent = o.text;
    $('op-fields').replaceChildren(...(o.fields ? o.fields() : []));
    $('op-comment').value = '';
    $('op-error').hidden = true;
    $('op-progress').hidden = true;
    $('op-results').hidden = true;
    $('op-results').replaceChildren();
    $('op-cancel').textContent = 'Back';
    const confirm = $('op-confirm');
    confirm.textContent = o.confirm;
    confirm.disabled = !!o.wait;
    confirm.hidden = false;
    confirm.className = o.danger ? 'danger' : 'primary';
    d.dataset.op = o.name;
    delete d.dataset.state;
    delete d.dataset.count;
    d.showModal();
  }

  function initOpDialog() {
    const d = $('op-dialog');
    if (!d) return;
    $('op-cancel').addEventListener('click', () => {
      d.close();
      if (opCurrent && opCurrent.closed) opCurrent.closed();
    });
    $('op-form').addEventListener('submit', async (e) => {
      e.preventDefault();
      const o = opCurrent;
      if (!o) return;
      const err = $('op-error');
      err.hidden = true;
      const confirm = $('op-confirm');
      confirm.disabled = true;
      try {
        await o.run($('op-comment').value.trim());
      } catch (ex) {
        err.textContent = 'Refused: ' + ex.message;
        err.hidden = false;
        confirm.disabled = false;
      }
    });
  }

  function opFinished(summary) {
    const d = $('op-dialog');
    d.dataset.state = 'done';
    $('op-confirm').hidden = true;
    $('op-cancel').textContent = 'Close';
    const p = $('op-progress');
    p.textContent = summary;
    p.hidden = false;
  }

  function pauseJob(name, paused, after) {
    const verb = paused ? 'resume' : 'pause';
    openOp({
      name: verb,
      title: (paused ? 'Resume job ' : 'Pause job ') + name,
      text: paused
        ? 'Its due runs are claimed again by every process.'
        : 'Its runs stay queued (triggers still create them) but no process claims them until it is resumed. Running runs finish.',
      confirm: 'Confirm: ' + verb,
      danger: !paused,
      run: async (comment) => {
        await api('/api/jobs/' + encodeURIComponent(name) + '/' + verb, { method: 'POST', body: comment ? { comment } : {} });
        $('op-dialog').close();
        toast('Job ' + name + (paused ? ' resumed.' : ' paused.'));
        if (after) await after();
      },
    });
  }

  async function refreshAttention() {
    const p = await api('/api/dashboard/runs?limit=1');
    setAttentionCount(p.attention_count);
  }

  // ---------- sign in ----------

  function initSignin() {
    const params = new URLSearchParams(location.search);
    const err = $('signin-error');
    if (params.get('msg')) {
      err.textContent = params.get('msg');
      err.hidden = false;
    }
    $('signin-form').addEventListener('submit', async (e) => {
      e.preventDefault();
      const t = $('token').value.trim();
      err.hidden = true;
      try {
        await api('/api/dashboard/whoami', { token: t });
        sessionStorage.setItem(TOKEN_KEY, t);
        const next = params.get('next') || '/';
        location.href = next.startsWith('/') && !next.startsWith('//') ? next : '/';
      } catch (ex) {
        err.textContent = 'Not signed in: ' + ex.message;
        err.hidden = false;
      }
    });
    markReady('signin');
  }

  // ---------- runs list ----------

  function initRuns(who) {
    const params = new URLSearchParams(location.search);
    const f = {
      status: params.get('status') || '',
      job: params.get('job') || '',
      q: params.get('q') || '',
      attention: params.get('attention') === '1' || params.get('attention') === 'true',
    };
    let cursors = []; // cursors of the pages before the current one
    let cursor = null;
    let visible = new Set();
    // Selected runs (kept across pages until cleared or the filter changes).
    const picked = new Set();

    const status = $('f-status');
    const job = $('f-job');
    const q = $('f-q');
    const toggle = $('attention-toggle');
    status.value = f.status;
    q.value = f.q;
    toggle.setAttribute('aria-pressed', String(f.attention));
    $('nav-attention').classList.toggle('active', f.attention);
    $('nav-runs').classList.toggle('active', !f.attention);

    for (const name of who.jobs) job.append(el('option', { value: name, text: name }));
    if (f.job && !who.jobs.includes(f.job)) job.append(el('option', { value: f.job, text: f.job }));
    job.value = f.job;

    function syncUrl() {
      const p = new URLSearchParams();
      if (f.attention) p.set('attention', '1');
      if (f.status) p.set('status', f.status);
      if (f.job) p.set('job', f.job);
      if (f.q) p.set('q', f.q);
      const s = p.toString();
      history.replaceState(null, '', s ? '/?' + s : '/');
    }

    function query(limit) {
      const p = new URLSearchParams();
      if (f.attention) p.set('attention', 'true');
      if (f.status) p.set('status', f.status);
      if (f.job) p.set('job', f.job);
      if (f.q) p.set('q', f.q);
      if (cursor) p.set('cursor', cursor);
      p.set('limit', String(limit || 50));
      return p.toString();
    }

    function nextEligible(r) {
      if (r.status === 'pending' || r.status === 'postponed') {
        const d = ms(r.run_after) - nowMs();
        return d > 0 ? 'in ' + human(d) : 'due';
      }
      if (r.status === 'needs_input') return 'waiting for input';
      if (r.status === 'running') return r.cancel_requested ? 'cancel requested' : 'running';
      return '—';
    }

    function row(r) {
      const open = () => { location.href = '/runs/' + r.id; };
      const pick = el('input', { type: 'checkbox', 'data-pick': r.id, 'aria-label': 'Select run ' + r.id, checked: picked.has(r.id) || bulkAll() });
      pick.disabled = bulkAll();
      pick.addEventListener('change', () => {
        if (pick.checked) picked.add(r.id);
        else picked.delete(r.id);
        updateBar();
      });
      return el('tr', { 'data-run-id': r.id, 'data-status': r.status, class: 'clickable', onclick: (e) => { if (e.target.tagName !== 'A' && !e.target.closest('td.pick')) open(); } },
        el('td', { class: 'pick' }, pick),
        el('td', {}, statusBadge(r.status, r.retry_scheduled)),
        el('td', { class: 'job' }, r.job, pausedBadge(r.job)),
        el('td', {}, el('a', { href: '/runs/' + r.id, class: 'run-link', title: r.id, text: r.id.slice(0, 8) + '…' + r.id.slice(-4) }),
          r.idempotency_key ? el('div', { class: 'muted small', text: 'key ' + r.idempotency_key }) : null),
        el('td', { class: 'num', text: String(r.attempt) }),
        el('td', { class: 'err' },
          r.last_error_class ? el('span', { class: 'errclass', text: r.last_error_class }) : '—',
          r.terminal_reason ? el('div', { class: 'muted small', text: r.terminal_reason }) : null,
          r.last_error_message ? el('div', { class: 'muted small trunc', title: r.last_error_message, text: r.last_error_message }) : null),
        el('td', { class: 'evalcell', 'data-eval-for': r.id }, r.status === 'failed' ? el('span', { class: 'muted', text: '…' }) : '—'),
        el('td', { class: 'nowrap', text: nextEligible(r), title: r.status === 'pending' || r.status === 'postponed' ? utc(r.run_after) : '' }),
        el('td', { class: 'nowrap', text: ago(r.created_at), title: utc(r.created_at) }));
    }

    async function evaluate(runs) {
      const ids = runs.filter((r) => r.status === 'failed').map((r) => r.id);
      if (!ids.length) return;
      const e = await api('/api/dashboard/evaluations?ids=' + ids.join(','));
      for (const ev of e.evaluations) {
        const cell = document.querySelector('[data-eval-for="' + ev.run_id + '"]');
        if (!cell) continue;
        if (!ev.worst) {
          cell.replaceChildren(el('span', { class: 'muted', title: 'No two failures of the same action and error class', text: 'no repeated failure' }));
          continue;
        }
        const badge = el('a', { href: '/runs/' + ev.run_id + '#evaluation', class: 'eval-badge', title: ev.explanation || '' },
          sevBadge(ev.worst, ev.worst + ': ' + ev.verdict.replace(/_/g, ' ')));
        cell.replaceChildren(badge);
      }
    }

    async function load(opts) {
      const quiet = opts && opts.quiet;
      let p;
      try {
        p = await api('/api/dashboard/runs?' + query());
      } catch (ex) {
        if (!quiet) toast(ex.message, true);
        return;
      }
      setAttentionCount(p.attention_count);
      skew = Date.parse(p.now) - Date.now();
      $('runs-table').dataset.query = query();
      const body = $('runs-body');
      const before = new Map([...body.children].map((tr) => [tr.dataset.runId, tr.dataset.status]));
      const rows = p.runs.map(row);
      body.replaceChildren(...rows);
      if (quiet) {
        for (const tr of rows) {
          if (!before.has(tr.dataset.runId) || before.get(tr.dataset.runId) !== tr.dataset.status) {
            tr.classList.add('flash');
          }
        }
      }
      visible = new Set(p.runs.map((r) => r.id));
      updateBar();
      $('runs-empty').hidden = p.runs.length > 0 || p.partial;
      $('page-first').hidden = cursors.length === 0 && !cursor;
      const next = $('page-next');
      next.hidden = !p.next_cursor;
      next.onclick = () => { cursors.push(cursor); cursor = p.next_cursor; load(); };
      const info = $('page-info');
      info.textContent = p.partial
        ? 'Searched ' + p.examined + ' older runs without filling the page; continue to search further.'
        : (p.runs.length ? p.runs.length + ' runs' + (cursor ? ' (older page)' : '') : '');
      $('new-activity').hidden = true;
      markReady('runs');
      evaluate(p.runs).catch(() => {});
    }

    $('page-first').onclick = () => { cursors = []; cursor = null; load(); };

    // ----- bulk actions: selected rows, or every run matching the filter
    // (`POST /api/runs/bulk`: a dry run counts first, then page by page
    // with the cursor, each run audited as if acted on alone).

    // The bulk filter knows job and status, not text search or "needs
    // attention"; and it needs a status (the states to act on).
    function filterProblem() {
      if (!f.status) return 'choose a status to act on all matching runs';
      if (f.q || f.attention) return 'the search and "Needs attention" cannot be used for all matching runs';
      return null;
    }

    const allBox = $('bulk-all');
    function bulkAll() { return allBox.checked && !filterProblem(); }

    function updateBar() {
      const problem = filterProblem();
      if (problem) allBox.checked = false;
      allBox.disabled = !!problem;
      $('bulk-all-note').textContent = problem || '';
      const all = bulkAll();
      $('bulk-count').textContent = all
        ? 'All ' + f.status + ' runs' + (f.job ? ' of ' + f.job : '') + ' selected'
        : picked.size ? picked.size + ' selected' : 'No runs selected';
      $('bulk-bar').hidden = false;
      $('bulk-bar').dataset.selected = all ? 'all' : String(picked.size);
      for (const b of document.querySelectorAll('[data-bulk]')) b.disabled = !all && picked.size === 0;
      const boxes = [...document.querySelectorAll('#runs-body input[data-pick]')];
      for (const b of boxes) {
        b.disabled = all;
        b.checked = all || picked.has(b.dataset.pick);
      }
      const page = $('pick-page');
      page.disabled = all;
      page.checked = all || (boxes.length > 0 && boxes.every((b) => b.checked));
    }

    allBox.addEventListener('change', updateBar);
    $('pick-page').addEventListener('change', () => {
      const on = $('pick-page').checked;
      for (const id of visible) {
        if (on) picked.add(id);
        else picked.delete(id);
      }
      updateBar();
    });
    $('bulk-clear').addEventListener('click', () => { picked.clear(); allBox.checked = false; updateBar(); });

    const BULK = {
      retry: { verb: 'retry', text: 'Each run goes back to pending with a fresh attempt budget (failed runs only).' },
      cancel: { verb: 'cancel', text: 'Pending, postponed and waiting runs stop at once; running runs at their next step boundary.', danger: true },
      retrigger: { verb: 'retrigger', text: 'Each run gets a new run with the same input; the runs themselves stay as they are.' },
      postpone: { verb: 'postpone', text: 'Not claimable before the time you choose (your local time).' },
      delete: { verb: 'delete', text: 'Final runs are deleted with their attempts, events and steps; a run_deleted audit event keeps each id. Export them first (docket runs export) to keep their history. This cannot be undone.', danger: true },
    };

    function bulkTarget() {
      if (bulkAll()) {
        const filter = { status: [f.status] };
        if (f.job) filter.job = f.job;
        return { filter };
      }
      return { ids: [...picked] };
    }

    async function openBulk(action) {
      const a = BULK[action];
      const target = bulkTarget();
      const d = $('op-dialog');
      let until = null;
      openOp({
        name: 'bulk-' + action,
        title: 'Bulk ' + a.verb,
        text: 'Counting the runs…',
        confirm: 'Confirm',
        danger: a.danger,
        wait: true,
        fields: action === 'postpone' ? () => {
          const t = new Date(Date.now() + 3600000);
          const pad = (n) => String(n).padStart(2, '0');
          const v = t.getFullYear() + '-' + pad(t.getMonth() + 1) + '-' + pad(t.getDate()) + 'T' + pad(t.getHours()) + ':' + pad(t.getMinutes());
          return [el('label', { for: 'op-until', text: 'Until' }), el('input', { id: 'op-until', type: 'datetime-local', value: v, required: true })];
        } : null,
        run: async (comment) => {
          const body = Object.assign({ action }, target);
          if (comment) body.comment = comment;
          if (action === 'postpone') {
            const v = $('op-until').value;
            until = new Date(v);
            if (!v || isNaN(until)) throw new Error('Choose a date and time.');
            body.until = until.toISOString();
          }
          const list = $('op-results');
          list.hidden = false;
          const progress = $('op-progress');
          progress.hidden = false;
          let ok = 0;
          let refused = 0;
          let cursor = null;
          // One bounded page per call; the cursor continues where the
          // last page stopped, so a long action never holds one transaction.
          do {
            const res = await api('/api/runs/bulk', { method: 'POST', body: Object.assign({}, body, { limit: 100, cursor }) });
            ok += res.succeeded;
            refused += res.failed;
            for (const r of res.results) {
              list.append(el('li', { 'data-run-id': r.run_id, 'data-ok': String(r.ok), class: r.ok ? 'done' : 'refused' },
                el('a', { href: '/runs/' + r.run_id, text: r.run_id.slice(0, 8) + '…' + r.run_id.slice(-4) }), ' ',
                r.ok ? (r.status || 'done') + (r.new_run_id ? ' → new run ' + r.new_run_id.slice(0, 8) + '…' : '')
                  : 'refused: ' + (r.message || r.error)));
            }
            progress.textContent = (ok + refused) + ' handled: ' + ok + ' done, ' + refused + ' refused…';
            cursor = res.next_cursor;
          } while (cursor);
          opFinished((ok + refused) + ' handled: ' + ok + ' done, ' + refused + ' refused.');
          d.dataset.ok = String(ok);
          d.dataset.refused = String(refused);
          picked.clear();
          allBox.checked = false;
          load();
        },
      });
      try {
        const dry = await api('/api/runs/bulk', { method: 'POST', body: Object.assign({ action, dry_run: true }, target) });
        const n = dry.matched || 0;
        d.dataset.count = String(n);
        $('op-text').textContent = n
          ? n + ' run' + (n === 1 ? '' : 's') + ' match. ' + a.text + ' Runs in a state the action does not apply to are reported, not changed.'
          : 'No runs match: nothing to do.';
        const confirm = $('op-confirm');
        confirm.textContent = 'Confirm: ' + a.verb + ' ' + n + ' run' + (n === 1 ? '' : 's');
        confirm.disabled = n === 0;
      } catch (ex) {
        $('op-error').textContent = ex.message;
        $('op-error').hidden = false;
      }
    }

    for (const b of document.querySelectorAll('[data-bulk]')) {
      b.addEventListener('click', () => openBulk(b.dataset.bulk));
    }

    function changed() {
      cursors = [];
      cursor = null;
      picked.clear();
      allBox.checked = false;
      syncUrl();
      load();
    }
    status.addEventListener('change', () => { f.status = status.value; changed(); });
    job.addEventListener('change', () => { f.job = job.value; changed(); });
    const searched = debounce(() => {
      if (f.q === q.value.trim()) return;
      f.q = q.value.trim();
      changed();
    }, 300);
    q.addEventListener('input', searched);
    q.addEventListener('change', searched);
    $('filters').addEventListener('submit', (e) => { e.preventDefault(); f.q = q.value.trim(); changed(); });
    toggle.addEventListener('click', () => {
      f.attention = !f.attention;
      toggle.setAttribute('aria-pressed', String(f.attention));
      $('nav-attention').classList.toggle('active', f.attention);
      $('nav-runs').classList.toggle('active', !f.attention);
      changed();
    });
    $('nav-attention').addEventListener('click', (e) => {
      e.preventDefault();
      if (!f.attention) toggle.click();
    });

    // Live: refresh the first page as events arrive; on older pages,
    // refresh the rows that changed.
    const seen = new Set();
    const refresh = debounce(async () => {
      const ids = [...seen];
      seen.clear();
      if (!cursor) {
        await load({ quiet: true });
        return;
      }
      refreshAttention().catch(() => {});
      for (const id of ids.filter((i) => visible.has(i))) {
        try {
          const d = await api('/api/runs/' + id);
          const old = document.querySelector('tr[data-run-id="' + id + '"]');
          if (old) {
            const fresh = row(d.run);
            fresh.classList.add('flash');
            old.replaceWith(fresh);
          }
        } catch (_) { /* gone */ }
      }
    }, 400);
    liveEvents('', (ev) => { seen.add(ev.run_id); refresh(); });
    load();
  }

  // ---------- one run ----------

  const ACTIONS = {
    retry: {
      label: 'Retry', path: 'retry', title: 'Retry this run',
      text: 'The same run goes back to pending: completed steps are kept, the failed step runs again, with a fresh attempt budget.',
      fields: () => [el('label', { for: 'ad-vars', text: 'Variables to update (a JSON object merged into the run\'s variables; leave empty for none)' }),
        el('textarea', { id: 'ad-vars', rows: '3', placeholder: '{"key": "value"}', spellcheck: 'false' })],
      body: () => {
        const v = $('ad-vars').value.trim();
        if (!v) return {};
        const parsed = JSON.parse(v);
        if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) throw new Error('Variables must be a JSON object.');
        return { updated_variables: parsed };
      },
      done: 'Retry scheduled',
    },
    skip: {
      label: 'Skip failed step', path: 'skip', title: 'Skip the failed step',
      text: 'The failed step is recorded as skipped with your comment and the run continues past it.',
      done: 'Step skipped',
    },
    retrigger: {
      label: 'Retrigger', path: 'retrigger', title: 'Retrigger as a new run',
      text: 'A new run with the same input, validated against the job\'s current definition. This run stays as it is.',
      done: 'New run triggered',
    },
    cancel: {
      label: 'Cancel', path: 'cancel', title: 'Cancel this run', danger: true,
      text: 'Pending, postponed and waiting runs stop at once; a running run stops at its next step boundary.',
      done: 'Cancelled',
    },
    postpone: {
      label: 'Postpone', path: 'postpone', title: 'Postpone this run',
      text: 'Not claimable before the time you choose (your local time). Spends no attempt budget.',
      fields: () => {
        const d = new Date(Date.now() + 3600000);
        const pad = (n) => String(n).padStart(2, '0');
        const v = d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + 'T' + pad(d.getHours()) + ':' + pad(d.getMinutes());
        return [el('label', { for: 'ad-until', text: 'Until' }), el('input', { id: 'ad-until', type: 'datetime-local', value: v, required: true })];
      },
      body: () => {
        const v = $('ad-until').value;
        const t = new Date(v);
        if (!v || isNaN(t)) throw new Error('Choose a date and time.');
        return { until: t.toISOString() };
      },
      done: 'Postponed',
    },
    approve: {
      label: 'Approve', path: 'approve', title: 'Approve the request', primary: true,
      text: 'The handler runs again and its wait returns Approved with this data.',
      fields: () => [el('label', { for: 'ad-data', text: 'Data for the handler (JSON)' }),
        el('textarea', { id: 'ad-data', rows: '3', spellcheck: 'false' }, '{}')],
      body: () => ({ data: JSON.parse($('ad-data').value.trim() || 'null') }),
      done: 'Approved',
    },
    reject: {
      label: 'Reject', path: 'reject', title: 'Reject the request', danger: true,
      text: 'The handler runs again and its wait returns Rejected with this data; what that means is the job\'s decision.',
      fields: () => [el('label', { for: 'ad-data', text: 'Data for the handler (JSON)' }),
        el('textarea', { id: 'ad-data', rows: '3', spellcheck: 'false' }, '{}')],
      body: () => ({ data: JSON.parse($('ad-data').value.trim() || 'null') }),
      done: 'Rejected',
    },
    delete: {
      label: 'Delete', path: 'delete', title: 'Delete this run', danger: true,
      text: 'The run is deleted with its attempts, events, steps and request evidence; a run_deleted audit event keeps its id, your name, the comment and its last state. Export it first (docket runs export) to keep its history. This cannot be undone.',
      done: 'Deleted',
    },
  };

  const BY_STATUS = {
    failed: ['retry', 'skip', 'retrigger', 'delete'],
    completed: ['retrigger', 'delete'],
    cancelled: ['retrigger', 'delete'],
    needs_input: ['approve', 'reject', 'postpone', 'cancel'],
    pending: ['postpone', 'cancel'],
    postponed: ['postpone', 'cancel'],
    running: ['cancel'],
  };

  function timelineEntries(d) {
    const out = [];
    let seq = 0;
    const add = (at, source, kind, attempt, summary, who, comment) => {
      out.push({ at: ms(at), source, kind, attempt, summary, who, comment, seq: seq++ });
    };
    for (const t of d.timeline) {
      add(t.at, 'event', t.kind, t.attempt, t.summary, t.actor, t.comment);
    }
    for (const a of d.attempts) {
      const parts = ['attempt ' + a.attempt + ' on ' + a.worker + ', lease ' + a.lease_id.slice(0, 8) + '…: ' + a.outcome];
      if (a.error_class) parts.push(a.error_class + (a.error_message ? ' — ' + a.error_message : ''));
      if (a.action) parts.push('in ' + a.action);
      if (a.duration_ms !== null && a.duration_ms !== undefined) parts.push('ran ' + human(a.duration_ms));
      if (a.gap_ms !== null && a.gap_ms !== undefined) parts.push(human(a.gap_ms) + ' after the previous attempt');
      add(a.started_at, 'attempt', 'attempt', a.attempt, parts.join('; '));
      if (a.retry) {
        const r = a.retry;
        add(a.finished_at || a.started_at, 'decision', 'retry decision', a.attempt,
          'policy ' + (r.policy || '?') + ' chose a delay of ' + human(r.delay_ms || 0) +
          (r.reason ? ' (' + r.reason + ')' : '') + '; eligible at ' + utc(r.eligible_at));
      }
    }
    for (const s of d.steps) {
      let text = 'step ' + s.name + ': ' + s.status;
      if (s.error_class) text += ' — ' + s.error_class + (s.error_message ? ': ' + s.error_message : '');
      add(s.updated_at, 'step', 'step ' + s.status, s.attempt, text, s.actor, s.comment);
    }
    for (const l of d.ledger) {
      let text = 'ledger ' + l.action + ' [' + l.idempotency_key + ']: ' + l.state;
      if (l.error_class) text += ' — ' + l.error_class + (l.error_message ? ': ' + l.error_message : '');
      add(l.updated_at, 'ledger', 'ledger ' + l.state, l.attempt, text);
    }
    // Events keep their stored order; an attempt row follows its
    // attempt_started event and a retry decision its retry_scheduled
    // event; steps and ledger rows follow the events of the same instant.
    const anchor = (kind, attempt) => {
      const e = out.find((x) => x.source === 'event' && x.kind === kind && x.attempt === attempt);
      return e ? e.seq + 0.5 : null;
    };
    for (const e of out) {
      if (e.source === 'event') e.rank = e.seq;
      else if (e.source === 'attempt') e.rank = anchor('attempt_started', e.attempt);
      else if (e.source === 'decision') e.rank = anchor('retry_scheduled', e.attempt);
      if (e.rank === null || e.rank === undefined) e.rank = 1e6 + e.seq;
    }
    out.sort((a, b) => a.at - b.at || a.rank - b.rank);
    return out;
  }

  function kindClass(e) {
    const k = e.kind;
    if (/fail|expired|refused|reject|cancel/.test(k)) return 'k-bad';
    if (/^operator|input_received|approve/.test(k) || e.who) return 'k-op';
    if (/retry|decision|postpone/.test(k)) return 'k-warn';
    if (/completed|committed/.test(k)) return 'k-ok';
    return 'k-plain';
  }

  function initRun(who) {
    const id = decodeURIComponent(location.pathname.split('/')[2] || '');
    let current = null;
    const dialog = $('action-dialog');
    let pendingAction = null;

    function fact(label, value, cls) {
      if (value === null || value === undefined || value === '') return [];
      return [el('dt', { text: label }), el('dd', { class: cls || null }, value)];
    }

    function renderHead(r) {
      $('r-status').replaceChildren(statusBadge(r.status, r.retry_scheduled));
      $('r-job').replaceChildren(r.job, pausedBadge(r.job) || '');
      $('r-id').textContent = r.id;
      document.title = r.job + ' ' + r.id.slice(0, 8) + ' · Docket';
      const next = (r.status === 'pending' || r.status === 'postponed')
        ? utc(r.run_after) + ' (' + (ms(r.run_after) > nowMs() ? 'in ' + human(ms(r.run_after) - nowMs()) : 'due') + ')'
        : null;
      $('r-facts').replaceChildren(
        ...fact('Attempts', r.attempt + (r.attempts_forgiven ? ' (' + r.attempts_forgiven + ' not counted)' : '')),
        ...fact('Next eligible', next),
        ...fact('Created', utc(r.created_at) + ' (' + ago(r.created_at) + ')'),
        ...fact('Updated', utc(r.updated_at)),
        ...fact('Finished', r.finished_at ? utc(r.finished_at) : null),
        ...fact('Terminal reason', r.terminal_reason, 'bad'),
        ...fact('Last error', r.last_error_class ? r.last_error_class + (r.last_error_message ? ': ' + r.last_error_message : '') : null, 'bad'),
        ...fact('Worker', r.worker ? r.worker + ' (lease ' + (r.lease_id || '').slice(0, 8) + '…, until ' + utc(r.lease_expires_at) + ')' : null),
        ...fact('Cancel requested', r.cancel_requested ? 'yes: stops at the next step boundary' : null),
        ...fact('Idempotency key', r.idempotency_key),
        ...fact('Debounce', r.debounce ? r.debounce.key + ' (keep ' + r.debounce.keep + ', window until ' + utc(r.debounce.until) + '): '
          + r.debounce.collapsed + ' trigger' + (r.debounce.collapsed === 1 ? '' : 's') + ' collapsed into this run' : null),
        ...fact('Correlation id', r.correlation_id),
        ...fact('Trace', r.trace_id && who && who.trace_url
          ? el('a', { href: who.trace_url.split('{trace_id}').join(encodeURIComponent(r.trace_id)), text: r.trace_id, target: '_blank', rel: 'noopener noreferrer' })
          : r.trace_id),
        ...fact('Retriggered from', r.retriggered_from ? el('a', { href: '/runs/' + r.retriggered_from, text: r.retriggered_from }) : null),
        ...fact('Parent', r.parent ? el('a', { id: 'r-parent', href: '/runs/' + r.parent, text: r.parent }) : null),
      );
      const acts = $('r-actions');
      acts.replaceChildren(...(BY_STATUS[r.status] || []).map((name) => {
        const a = ACTIONS[name];
        return el('button', {
          type: 'button', id: 'act-' + name, 'data-action': name,
          class: 'action' + (a.danger ? ' danger' : '') + (a.primary ? ' primary' : ''),
          text: a.label, onclick: () => openAction(name),
        });
      }));
      $('r-input').textContent = json(r.input);
      $('r-variables').textContent = json(r.variables);
      $('r-output').textContent = json(r.output);
      $('r-request-card').hidden = !r.input_request;
      $('r-request').textContent = json(r.input_request);
    }

    // A run's children (first page, spawn order) and its current wait.
    async function renderChildren(d) {
      const card = $('r-children-card');
      // Any durable wait (children, a signal, a sleep) says why, in words.
      if (d.run.wait) {
        $('r-facts').append(...fact('Waiting', d.run.wait.summary));
      }
      if (!d.children) {
        card.hidden = true;
        return;
      }
      const page = await api('/api/runs?parent=' + encodeURIComponent(d.run.id) + '&limit=100');
      $('r-children-count').textContent = '(' + d.children + ')';
      card.querySelector('tbody').replaceChildren(...page.runs.map((c) => el('tr', { 'data-child': c.id },
        el('td', {}, el('a', { href: '/runs/' + c.id, text: c.id })),
        el('td', { text: c.job }),
        el('td', {}, statusBadge(c.status, c.retry_scheduled)),
        el('td', { class: 'nowrap', text: utc(c.updated_at) }))));
      const more = $('r-children-more');
      more.hidden = d.children <= page.runs.length;
      more.textContent = 'Showing the first ' + page.runs.length + ' of ' + d.children + ' (GET /api/runs?parent=' + d.run.id + ' pages through all).';
      card.hidden = false;
    }

    function renderForensics(f) {
      const badge = $('r-eval');
      if (f.worst) {
        const top = f.verdicts.find((v) => v.severity === f.worst);
        badge.replaceChildren(sevBadge(f.worst, f.worst + ': ' + top.verdict.replace(/_/g, ' ')));
        badge.hidden = false;
      } else {
        badge.hidden = true;
      }
      const list = $('r-verdicts');
      if (!f.verdicts.length) {
        list.replaceChildren(el('li', { class: 'muted', text: 'No two failures of the same action and error class: nothing to judge.' }));
      } else {
        const rank = { critical: 0, warning: 1, info: 2 };
        const vs = [...f.verdicts].sort((a, b) => rank[a.severity] - rank[b.severity] || a.second.attempt - b.second.attempt);
        list.replaceChildren(...vs.map((v) => el('li', { class: 'verdict v-' + v.severity, 'data-verdict': v.verdict },
          sevBadge(v.severity), ' ',
          el('strong', { text: v.verdict.replace(/_/g, ' ') }), ' ',
          el('span', { class: 'muted', text: v.action + ' · ' + v.error_class + ' · attempt ' + v.first.attempt + ' → ' + v.second.attempt +
            (v.first.run_id !== v.second.run_id ? ' (run ' + v.second.run_id.slice(0, 8) + '…)' : '') +
            ' · gap ' + human(v.gap_ms) + (v.expected_delay_ms !== null && v.expected_delay_ms !== undefined ? ' vs policy delay ' + human(v.expected_delay_ms) : '') }),
          el('div', { class: 'explain', text: v.explanation }))));
      }
      putSvg($('r-chart'), f.chart_svg);
    }

    function renderTimeline(d) {
      const entries = timelineEntries(d);
      const t0 = entries.length ? entries[0].at : 0;
      const body = $('r-timeline').querySelector('tbody');
      body.replaceChildren(...entries.map((e) => el('tr', { class: 'src-' + e.source, 'data-kind': e.kind },
        el('td', { class: 'nowrap', text: utc(e.at) }),
        el('td', { class: 'nowrap muted', text: '+' + human(e.at - t0) }),
        el('td', {}, el('span', { class: 'kind ' + kindClass(e), text: e.kind.replace(/_/g, ' ') })),
        el('td', { class: 'num', text: e.attempt === null || e.attempt === undefined ? '' : String(e.attempt) }),
        el('td', { text: e.summary }),
        el('td', {}, e.who || '', e.comment ? el('div', { class: 'comment', text: '“' + e.comment + '”' }) : null))));
    }

    async function load() {
      try {
        const [d, f] = await Promise.all([
          api('/api/runs/' + encodeURIComponent(id)),
          api('/api/runs/' + encodeURIComponent(id) + '/forensics'),
        ]);
        current = d.run;
        renderHead(d.run);
        renderForensics(f);
        renderTimeline(d);
        await renderChildren(d);
        markReady('run');
      } catch (ex) {
        if (ex.status === 404) {
          $('r-job').textContent = 'Run not found';
          $('r-id').textContent = id;
          markReady('run-missing');
        } else {
          toast(ex.message, true);
        }
      }
    }

    function openAction(name) {
      const a = ACTIONS[name];
      pendingAction = name;
      $('ad-title').textContent = a.title;
      $('ad-text').textContent = a.text + (current ? ' Run ' + current.id + ' is ' + current.status + '.' : '');
      $('ad-fields').replaceChildren(...(a.fields ? a.fields() : []));
      $('ad-comment').value = '';
      $('ad-error').hidden = true;
      const confirm = $('ad-confirm');
      confirm.textContent = 'Confirm: ' + a.label.toLowerCase();
      confirm.disabled = false;
      confirm.className = a.danger ? 'danger' : 'primary';
      dialog.dataset.action = name;
      dialog.showModal();
    }

    $('ad-cancel').addEventListener('click', () => dialog.close());
    $('action-form').addEventListener('submit', async (e) => {
      e.preventDefault();
      const name = pendingAction;
      const a = ACTIONS[name];
      const err = $('ad-error');
      err.hidden = true;
      let body;
      try {
        body = a.body ? a.body() : {};
      } catch (ex) {
        err.textContent = ex instanceof SyntaxError ? 'Not valid JSON: ' + ex.message : ex.message;
        err.hidden = false;
        return;
      }
      const comment = $('ad-comment').value.trim();
      if (comment) body.comment = comment;
      const confirm = $('ad-confirm');
      confirm.disabled = true;
      try {
        const res = await api('/api/runs/' + encodeURIComponent(id) + '/' + a.path, { method: 'POST', body });
        dialog.close();
        toast(a.done);
        if (name === 'delete') {
          location.href = '/';
          return;
        }
        if (name === 'retrigger' && res && res.run) {
          location.href = '/runs/' + res.run.id;
          return;
        }
        await load();
      } catch (ex) {
        err.textContent = 'Refused: ' + ex.message;
        err.hidden = false;
        confirm.disabled = false;
      }
    });

    const refresh = debounce(() => { load(); refreshAttention().catch(() => {}); }, 300);
    liveEvents('run_id=' + encodeURIComponent(id), refresh);
    load();
  }

  // ---------- overview ----------

  function initOverview() {
    let win = new URLSearchParams(location.search).get('window') === '1d' ? '1d' : '1h';
    const STATUSES = ['pending', 'running', 'needs_input', 'postponed', 'completed', 'failed', 'cancelled'];
    $('nav-overview').classList.add('active');

    async function load() {
      let s;
      try {
        s = await api('/api/stats?window=' + win);
      } catch (ex) {
        toast(ex.message, true);
        return;
      }
      for (const b of document.querySelectorAll('[data-window]')) {
        b.setAttribute('aria-pressed', String(b.dataset.window === win));
      }
      setAttentionCount(s.attention_count);
      $('ov-attention').textContent = String(s.attention_count);
      $('ov-rate').textContent = s.failure_rate === null ? '—' : (s.failure_rate * 100).toFixed(1) + '%';
      $('ov-retries').textContent = String(s.classes.reduce((n, c) => n + c.retries, 0));
      $('ov-failures').textContent = String(s.classes.reduce((n, c) => n + c.failures, 0));
      $('ov-note').textContent = 'Runs triggered since ' + utc(s.since) +
        (s.capped ? ' (the newest ' + s.examined + ' only)' : '') + '.';
      putSvg($('ov-chart'), s.chart_svg);
      const cls = $('ov-classes').querySelector('tbody');
      cls.replaceChildren(...(s.classes.length ? s.classes.map((c) => el('tr', {},
        el('td', {}, el('span', { class: 'errclass', text: c.error_class })),
        el('td', { class: 'num', text: String(c.failures) }),
        el('td', { class: 'num', text: String(c.retries) }),
        el('td', { class: 'num', text: String(c.terminal) }))) : [el('tr', {}, el('td', { colspan: '4', class: 'muted', text: 'No failed attempts in this window.' }))]));
      let queues = [];
      try {
        queues = await loadJobs();
      } catch (ex) {
        toast(ex.message, true);
      }
      $('ov-queues').querySelector('tbody').replaceChildren(...(queues.length ? queues.map((j) => el('tr', { 'data-job': j.name },
        el('td', {}, el('a', { href: '/?job=' + encodeURIComponent(j.name), text: j.name })),
        el('td', {}, el('span', { class: 'status ' + (j.paused ? 's-postponed' : 's-completed'), 'data-state': j.paused ? 'paused' : 'active', text: j.paused ? 'paused' : 'active' })),
        el('td', { class: 'num' + (j.queue.due ? ' hot' : ''), 'data-q': 'due', text: String(j.queue.due) }),
        el('td', { class: 'num', 'data-q': 'lag', title: j.queue.lag_seconds + ' s', text: j.queue.due ? human(j.queue.lag_seconds * 1000) : '—' }),
        el('td', { class: 'num', 'data-q': 'running', text: String(j.queue.running) }),
        el('td', { class: 'num' + (j.queue.held ? ' hot' : ''), 'data-q': 'held', text: String(j.queue.held) }),
        el('td', { class: 'num', 'data-q': 'scheduled', text: String(j.queue.scheduled) }),
        el('td', { class: 'num' + (j.queue.deferred ? ' hot' : ''), 'data-q': 'deferred', text: String(j.queue.deferred) }),
        el('td', { class: 'num', text: j.queue.throughput_per_minute.toFixed(1) }),
        el('td', {}, el('button', { type: 'button', class: 'small', 'data-action': j.paused ? 'resume' : 'pause',
          text: j.paused ? 'Resume' : 'Pause', onclick: () => pauseJob(j.name, j.paused, load) }))))
        : [el('tr', {}, el('td', { colspan: '10', class: 'muted', text: 'No jobs registered.' }))]));
      const jobs = $('ov-jobs').querySelector('tbody');
      jobs.replaceChildren(...(s.jobs.length ? s.jobs.map((j) => el('tr', { 'data-job': j.job },
        el('td', {}, el('a', { href: '/?job=' + encodeURIComponent(j.job), text: j.job }), pausedBadge(j.job)),
        ...STATUSES.map((st) => {
          const n = j.counts[st] || 0;
          return el('td', { class: 'num' + (n && (st === 'failed' || st === 'needs_input') ? ' hot' : '') },
            n ? el('a', { href: '/?job=' + encodeURIComponent(j.job) + '&status=' + st, text: String(n) }) : '0');
        }),
        el('td', { class: 'num', text: String(j.total) }))) : [el('tr', {}, el('td', { colspan: '9', class: 'muted', text: 'No jobs.' }))]));
      await loadLimits();
      const br = $('ov-breakers');
      if (s.breakers === null || s.breakers === undefined) {
        br.replaceChildren(el('li', { class: 'muted', text: 'none reported — this server has no connections (docket serve --config docket.toml), or runs no worker (--role api)' }));
      } else if (!s.breakers.length) {
        br.replaceChildren(el('li', { class: 'muted', text: 'none' }));
      } else {
        br.replaceChildren(...s.breakers.map((b) => el('li', { 'data-connection': b.connection },
          el('strong', { text: b.connection }), ' ', el('span', { class: 'status s-failed', text: b.state.replace('_', '-') }),
          el('span', { class: 'muted', text: (b.reset_at ? ' until ' + utc(b.reset_at) : '') +
            ' · opened ' + b.times_opened + '× · ' + b.deferred + ' runs deferred' }))));
      }
      const cn = $('ov-connections');
      cn.replaceChildren(...(s.connections.length ? s.connections.map((c) => el('li', {},
        el('strong', { text: c.name }), ' ', el('span', { class: 'status s-failed', text: c.status }),
        el('span', { class: 'muted', text: ' since ' + utc(c.updated_at) + ' by ' + c.updated_by + (c.comment ? ': “' + c.comment + '”' : '') })))
        : [el('li', { class: 'muted', text: 'none' })]));
      // The roster of remote workers: name, jobs, last claim or heartbeat.
      let ws = { workers: [] };
      try {
        ws = await api('/api/workers');
      } catch (ex) {
        toast(ex.message, true);
      }
      const wl = $('ov-workers');
      wl.replaceChildren(...(ws.workers.length ? ws.workers.map((w) => el('li', { 'data-worker': w.name },
        el('strong', { text: w.name }), ' ',
        el('span', { class: 'muted', text: (w.jobs.join(', ') || 'no jobs') + ' · last seen ' + utc(w.last_seen_at) +
          ' · ' + w.running + ' running' })))
        : [el('li', { class: 'muted', text: 'none — remote workers appear here once they claim with a worker token' })]));
      markReady('overview');
    }

    // The Limits card: concurrency keys (GET /api/limits) and, per
    // connection, its rate limit and breaker (GET /api/connections/{name}/limits).
    async function loadLimits() {
      const KEYS = 10;
      let lim = { concurrency: [], truncated: false };
      let conns = { connections: [] };
      try {
        [lim, conns] = await Promise.all([api('/api/limits'), api('/api/connections')]);
      } catch (ex) {
        toast(ex.message, true);
      }
      const busy = (k) => (k.limit ? k.running / k.limit : 0);
      const keys = lim.concurrency.slice().sort((a, b) =>
        (b.held - a.held) || (busy(b) - busy(a)) || (b.due - a.due) || a.key.localeCompare(b.key));
      $('ov-limit-keys').querySelector('tbody').replaceChildren(...(keys.length ? keys.slice(0, KEYS).map((k) =>
        el('tr', { 'data-key': k.key, 'data-held': String(k.held) },
          el('td', {}, el('code', { text: k.key })),
          el('td', { class: 'num' + (k.running >= k.limit ? ' hot' : ''), 'data-q': 'running', text: k.running + ' / ' + k.limit }),
          el('td', { class: 'num', 'data-q': 'due', text: String(k.due) }),
          el('td', { class: 'num', 'data-q': 'waiting', text: String(k.waiting) }),
          el('td', {}, k.held
            ? el('span', { class: 'status s-postponed', title: k.due + ' due runs wait for a slot', text: 'held' })
            : el('span', { class: 'muted', text: k.running >= k.limit ? 'full' : 'room' }))))
        : [el('tr', {}, el('td', { colspan: '5', class: 'muted', text: 'No concurrency key has runs running or waiting.' }))]));
      const more = keys.length - Math.min(keys.length, KEYS);
      $('ov-limit-keys-note').textContent = more || lim.truncated
        ? (more + (lim.truncated ? '+' : '') + ' more keys: GET /api/limits or docket limits lists them all.') : '';
      let rows = [];
      try {
        rows = await Promise.all(conns.connections.map((c) =>
          api('/api/connections/' + encodeURIComponent(c.name) + '/limits')));
      } catch (ex) {
        toast(ex.message, true);
      }
      $('ov-limit-conns').querySelector('tbody').replaceChildren(...(rows.length ? rows.map((l) => {
        const r = l.rate_limit;
        const bs = l.buckets;
        const left = bs.length ? Math.min(...bs.map((b) => b.tokens_left)) : null;
        const empty = bs.filter((b) => b.tokens_left === 0).map((b) => ms(b.next_token_at));
        const next = empty.length ? Math.min(...empty) : null;
        const reserved = bs.reduce((n, b) => n + b.reserved, 0);
        const state = l.breaker.state;
        return el('tr', { 'data-connection': l.connection },
          el('td', {}, el('strong', { text: l.connection })),
          el('td', { 'data-q': 'rate', text: r ? r.per_second + '/s, burst ' + r.burst + (r.key ? ' per ' + r.key : '') : 'none' }),
          el('td', { class: 'num' + (left === 0 ? ' hot' : ''), 'data-q': 'tokens',
            title: bs.length > 1 ? 'the fewest of ' + bs.length + ' buckets' : null,
            text: !r ? '—' : left === null ? String(r.burst) : String(left) }),
          el('td', { 'data-q': 'next', text: !r ? '—' : next === null ? 'now' : utc(next) + ' (in ' + human(next - nowMs()) + ')' }),
          el('td', { class: 'num', 'data-q': 'reserved', text: r ? String(reserved) : '—' }),
          el('td', {}, el('span', { class: 'status ' + (state === 'closed' ? 's-completed' : 's-failed'), 'data-breaker': state,
            text: state.replace('_', '-') + (state === 'open' && l.breaker.reset_at ? ' until ' + utc(l.breaker.reset_at) : '') })));
      }) : [el('tr', {}, el('td', { colspan: '6', class: 'muted', text: 'No connections (docket serve --config docket.toml).' }))]));
    }

    for (const b of document.querySelectorAll('[data-window]')) {
      b.addEventListener('click', () => {
        win = b.dataset.window;
        history.replaceState(null, '', '/overview' + (win === '1d' ? '?window=1d' : ''));
        load();
      });
    }
    // Live, but at most every few seconds: the window is an aggregate.
    let last = 0;
    let timer = null;
    liveEvents('', () => {
      if (timer) return;
      const wait = Math.max(0, 5000 - (Date.now() - last));
      timer = setTimeout(() => { timer = null; last = Date.now(); load(); }, wait);
    });
    load();
  }

  // ---------- schedules ----------

  function initSchedules() {
    $('nav-schedules').classList.add('active');
    let selected = new URLSearchParams(location.search).get('name');

    function rule(sc) {
      return sc.cron !== null && sc.cron !== undefined ? sc.cron : 'every ' + human(sc.every_ms);
    }

    async function act(name, verb) {
      try {
        // Audited with the token's name (a comment can be given through
        // the API or `docket schedules pause NAME --comment …`).
        await api('/api/schedules/' + encodeURIComponent(name) + '/' + verb, { method: 'POST', body: {} });
        toast('Schedule ' + name + (verb === 'pause' ? ' paused.' : ' resumed.'));
      } catch (ex) {
        toast(ex.message, true);
      }
      await load();
    }

    async function loadDetail() {
      const box = $('sc-detail');
      if (!selected) { box.hidden = true; return; }
      let d;
      try {
        d = await api('/api/schedules/' + encodeURIComponent(selected));
      } catch (ex) {
        toast(ex.message, true);
        box.hidden = true;
        return;
      }
      const sc = d.schedule;
      box.hidden = false;
      box.dataset.schedule = sc.name;
      $('sc-name').textContent = sc.name;
      $('sc-policy').textContent = rule(sc) + ' in ' + sc.timezone + ' · overlap ' + sc.overlap +
        ' · catch-up ' + sc.catch_up + ' (window ' + human(sc.catch_up_window_ms) + ')' +
        ' · jitter ' + human(sc.jitter_ms) + ' · from ' + sc.source;
      $('sc-next').querySelector('tbody').replaceChildren(...(sc.next.length ? sc.next.map((f) => el('tr', {},
        el('td', { text: f.local }), el('td', { text: utc(f.slot) }), el('td', { text: utc(f.fires_at) })))
        : [el('tr', {}, el('td', { colspan: '3', class: 'muted', text: sc.enabled ? 'No further slots.' : 'Paused.' }))]));
      $('sc-history').querySelector('tbody').replaceChildren(...(d.history.length ? d.history.map((h) => el('tr', { 'data-kind': h.kind },
        el('td', { text: utc(h.at) }),
        el('td', {}, el('span', { class: 'status s-' + (h.kind === 'skipped' ? 'failed' : h.kind === 'buffered' ? 'postponed' : h.slot ? 'completed' : 'pending'), text: h.kind })),
        el('td', { text: h.slot ? utc(h.slot) : '' }),
        el('td', {}, h.run_id ? el('a', { href: '/runs/' + h.run_id, text: '…' + h.run_id.slice(-12) }) : ''),
        el('td', { text: h.reason || '' }),
        el('td', { text: h.actor || '' }),
        el('td', { text: h.comment || '' })))
        : [el('tr', {}, el('td', { colspan: '7', class: 'muted', text: 'Nothing yet.' }))]));
    }

    async function load() {
      let list;
      try {
        list = await api('/api/schedules');
      } catch (ex) {
        toast(ex.message, true);
        return;
      }
      const body = $('sc-list').querySelector('tbody');
      body.replaceChildren(...(list.schedules.length ? list.schedules.map((sc) => el('tr', { 'data-schedule': sc.name },
        el('td', {}, el('a', { href: '/schedules?name=' + encodeURIComponent(sc.name), text: sc.name,
          onclick: (e) => { e.preventDefault(); selected = sc.name; history.replaceState(null, '', '/schedules?name=' + encodeURIComponent(sc.name)); loadDetail(); } })),
        el('td', {}, sc.job, pausedBadge(sc.job)),
        el('td', {}, el('code', { text: rule(sc) })),
        el('td', { text: sc.timezone }),
        el('td', {}, el('span', { class: 'status ' + (sc.enabled ? 's-completed' : 's-postponed'), 'data-state': sc.enabled ? 'enabled' : 'paused', text: sc.enabled ? 'enabled' : 'paused' })),
        el('td', { text: sc.next.length ? sc.next[0].local : '—' }),
        el('td', { text: sc.next.length ? utc(sc.next[0].slot) : '—' }),
        el('td', { text: sc.last_slot ? utc(sc.last_slot) : '—' }),
        el('td', {}, sc.last_run_id ? el('a', { href: '/runs/' + sc.last_run_id }, statusBadge(sc.last_run_status || 'pending')) : '—'),
        el('td', {}, el('button', { type: 'button', class: 'small', 'data-action': sc.enabled ? 'pause' : 'resume',
          text: sc.enabled ? 'Pause' : 'Resume', onclick: () => act(sc.name, sc.enabled ? 'pause' : 'resume') }))))
        : [el('tr', {}, el('td', { colspan: '10', class: 'muted', text: 'No schedules. Declare [schedules.NAME] in docket.toml or POST /api/schedules.' }))]));
      await loadDetail();
      markReady('schedules');
    }

    let timer = null;
    liveEvents('', () => {
      if (timer) return;
      timer = setTimeout(() => { timer = null; load(); }, 2000);
    });
    load();
  }

  // ---------- start ----------

  async function start() {
    if (page === 'signin') {
      if (NO_AUTH) {
        // Nothing to sign in to: go on to the page asked for.
        const next = new URLSearchParams(location.search).get('next') || '/';
        location.replace(next.startsWith('/') && !next.startsWith('//') ? next : '/');
        return;
      }
      initSignin();
      return;
    }
    if (!NO_AUTH && !token()) {
      signOut();
      return;
    }
    if (NO_AUTH) $('signout').hidden = true;
    else $('signout').addEventListener('click', () => signOut('Signed out.'));
    let who;
    try {
      who = await api('/api/dashboard/whoami');
      skew = Date.parse(who.now) - Date.now();
      $('who-name').textContent = who.name;
      $('who-tenant').textContent = who.tenant;
      $('who').hidden = false;
    } catch (_) {
      return;
    }
    initOpDialog();
    // Which jobs are paused, for the badges (the overview reloads it).
    await loadJobs().catch(() => {});
    if (page !== 'runs') refreshAttention().catch(() => {});
    if (page === 'runs') initRuns(who);
    else if (page === 'run') initRun(who);
    else if (page === 'overview') initOverview();
    else if (page === 'schedules') initSchedules();
  }

  start();
})();
