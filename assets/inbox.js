// Switchboard inbox: the conversation list, the conversation view and the composer.
// Plain JavaScript, no build step. Everything goes through the REST API (/api/v1/*) and the
// event stream (/api/v1/events) with the session cookie; state-changing requests carry the
// session's CSRF token in X-CSRF-Token. Text from the API is only ever put in the page with
// textContent; the one HTML fragment (search snippets) is filtered down to text and <mark>.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const csrf = meta('csrf-token');
  const me = meta('agent-name');

  const state = {
    conversations: new Map(), // id -> Conversation
    current: null,            // the open Conversation
    messages: new Map(),      // id -> Message of the open conversation
    highlight: null,          // message id to highlight once shown
    typingTimers: new Map(),  // agent -> timeout of their "typing" line
    idempotencyKey: null,     // one per composed message
    lastTypingSent: 0,
    typingIdle: null,
    windowTimer: null,        // closes the shown WhatsApp window at its expires_at
  };

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, code, message) { super(message); this.status = status; this.code = code; }
  }

  async function api(path, { method = 'GET', body, headers = {} } = {}) {
    const init = { method, headers: { Accept: 'application/json', ...headers }, credentials: 'same-origin' };
    if (method !== 'GET') init.headers['X-CSRF-Token'] = csrf;
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(path, init);
    if (resp.status === 401) { location.href = '/sign-in?next=' + encodeURIComponent(location.pathname + location.search); throw new ApiError(401, 'unauthorized', 'signed out'); }
    const text = await resp.text();
    const data = text ? JSON.parse(text) : null;
    if (!resp.ok) {
      const err = (data && data.error) || {};
      throw new ApiError(resp.status, err.code || 'error', err.message || data && data.error || resp.statusText);
    }
    return data;
  }

  // ---------------------------------------------------------------- helpers

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else node.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children) if (c) node.append(c);
    return node;
  }

  function contactName(c) {
    return (c.contact && c.contact.display_name) || c.counterpart;
  }

  function initials(c) {
    const name = c.contact && c.contact.display_name;
    if (!name) return c.channel === 'whatsapp' ? 'WA' : '#';
    return name.split(/\s+/).filter(Boolean).slice(0, 2).map((w) => w[0].toUpperCase()).join('');
  }

  function shortTime(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    const today = new Date();
    return d.toDateString() === today.toDateString()
      ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
      : d.toLocaleDateString([], { month: 'short', day: 'numeric' });
  }

  // "pt" -> "Portuguese" (the browser's names; the code itself when it has none).
  const languageNames = typeof Intl.DisplayNames === 'function' ? new Intl.DisplayNames(['en'], { type: 'language' }) : null;
  function languageName(code) {
    try { return (languageNames && languageNames.of(code)) || code; } catch (_) { return code; }
  }

  function fullTime(iso) {
    return new Date(iso).toLocaleString([], { dateStyle: 'medium', timeStyle: 'short' });
  }

  function activity(c) {
    return (c.last_message && c.last_message.at) || c.updated_at;
  }

  // Keeps only text and <mark> from an HTML snippet.
  function safeSnippet(html) {
    const doc = new DOMParser().parseFromString(`<p>${html}</p>`, 'text/html');
    const out = document.createDocumentFragment();
    for (const node of doc.body.firstChild.childNodes) {
      if (node.nodeName === 'MARK') out.append(el('mark', { text: node.textContent }));
      else out.append(document.createTextNode(node.textContent));
    }
    return out;
  }

  // ---------------------------------------------------------------- conversation list

  const listEl = $('conversation-list');

  function filters() {
    return { channel: $('filter-channel').value, unread: $('filter-unread').checked };
  }

  async function loadConversations() {
    const f = filters();
    const q = new URLSearchParams({ limit: '100' });
    if (f.channel) q.set('channel', f.channel);
    if (f.unread) q.set('unread', 'true');
    const page = await api('/api/v1/conversations?' + q);
    state.conversations.clear();
    for (const c of page.data) state.conversations.set(c.id, c);
    renderList();
  }

  function visible(c) {
    const f = filters();
    if (f.channel && c.channel !== f.channel) return false;
    if (f.unread && c.unread_count === 0 && (!state.current || state.current.id !== c.id)) return false;
    return true;
  }

  function renderList() {
    const items = [...state.conversations.values()].filter(visible)
      .sort((a, b) => activity(b).localeCompare(activity(a)) || b.id.localeCompare(a.id));
    listEl.replaceChildren(...items.map(conversationItem));
    $('list-empty').hidden = items.length > 0;
  }

  function conversationItem(c) {
    const unread = c.unread_count > 0;
    const channel = c.channel === 'whatsapp' ? 'WhatsApp' : 'SMS';
    const preview = c.last_message
      ? (c.last_message.direction === 'outbound' ? 'You: ' : '') + c.last_message.preview
      : 'No messages';
    const a = el('a', {
      href: '/?c=' + c.id, 'data-id': c.id, class: unread ? 'unread' : '',
      'aria-current': state.current && state.current.id === c.id ? 'true' : null,
    },
      el('span', { class: 'avatar ' + c.channel, 'aria-hidden': 'true', text: initials(c) }),
      el('span', { class: 'conv-name' },
        contactName(c),
        el('span', { class: 'visually-hidden', text: `, ${channel}` }),
        c.opted_out ? el('span', { class: 'opted-out', title: 'Opted out: messages to this number are refused', text: '⊘ opted out' }) : null),
      el('span', { class: 'conv-time', text: shortTime(activity(c)) }),
      el('span', { class: 'conv-preview' },
        el('span', { class: 'chan ' + c.channel, 'aria-hidden': 'true', text: c.channel === 'whatsapp' ? 'WA' : 'SMS' }),
        preview),
      unread ? el('span', { class: 'unread-badge', 'aria-label': `${c.unread_count} unread`, text: String(c.unread_count) }) : null);
    a.addEventListener('click', (e) => {
      if (e.metaKey || e.ctrlKey || e.shiftKey) return;
      e.preventDefault();
      openConversation(c.id);
    });
    return el('li', {}, a);
  }

  // ---------------------------------------------------------------- conversation view

  const messagesEl = $('messages');

  async function openConversation(id, highlight) {
    state.highlight = highlight || null;
    const [conv, page] = await Promise.all([
      api(`/api/v1/conversations/${id}`),
      api(`/api/v1/conversations/${id}/messages?limit=100`),
    ]);
    state.current = conv;
    state.conversations.set(conv.id, conv);
    state.messages.clear();
    state.idempotencyKey = null;
    history.replaceState(null, '', '/?c=' + id + (highlight ? '&m=' + highlight : ''));
    $('conversation-empty').hidden = true;
    $('conversation-view').hidden = false;
    document.querySelector('.inbox').classList.add('show-conversation');
    renderHeader();
    messagesEl.replaceChildren();
    for (const m of page.data.reverse()) addMessage(m);
    for (const agent of [...state.typingTimers.keys()]) clearTyping(agent);
    $('composer-error').hidden = true;
    renderList();
    scrollToEnd();
    if (conv.unread_count > 0) {
      api(`/api/v1/conversations/${id}/read`, { method: 'POST' }).catch(showError);
    }
    updateCounter();
  }

  function closeConversation() {
    state.current = null;
    document.querySelector('.inbox').classList.remove('show-conversation');
    $('conversation-view').hidden = true;
    $('conversation-empty').hidden = false;
    history.replaceState(null, '', '/');
    renderList();
  }

  function renderHeader() {
    const c = state.current;
    $('conv-title').textContent = contactName(c);
    const channel = c.channel === 'whatsapp' ? 'WhatsApp' : 'SMS';
    const language = c.language ? ` · ${languageName(c.language)}` : '';
    $('conv-sub').textContent = `${channel} · ${c.counterpart}${language}${c.opted_out ? ' · opted out' : ''}`;
    $('conv-sub').title = c.language
      ? `The customer writes in ${languageName(c.language)} (detected from their latest messages, confidence ${Math.round(c.language_confidence * 100)} %)`
      : '';
    renderWindow();
  }

  // The WhatsApp 24-hour customer-service window, as the API reports it: the Conversation's
  // whatsapp_window (null for SMS), kept current by conversation.updated events. `open` is
  // what the gateway saw when it rendered the JSON; the page then counts down to expires_at.
  function windowState() {
    const c = state.current;
    const w = c && c.whatsapp_window;
    if (!w) return null;
    const until = w.expires_at ? new Date(w.expires_at) : null;
    return { open: Boolean(w.open && until && Date.now() < until.getTime()), until, expiresAt: w.expires_at };
  }

  function renderWindow() {
    clearTimeout(state.windowTimer);
    const w = windowState();
    const node = $('conv-window');
    node.hidden = !w;
    if (!w) { node.replaceChildren(); return; }
    node.classList.toggle('closed', !w.open);
    if (w.open) {
      node.replaceChildren('Window open until ', el('time', {
        datetime: w.expiresAt, title: fullTime(w.expiresAt),
        text: w.until.toLocaleString([], { weekday: 'short', hour: '2-digit', minute: '2-digit' }),
      }));
      // Closes by itself when the time comes (a window is at most 24 hours long).
      state.windowTimer = setTimeout(renderWindow, Math.min(w.until.getTime() - Date.now() + 100, 2 ** 31 - 1));
    } else {
      node.replaceChildren(w.expiresAt
        ? el('span', { title: `Closed at ${fullTime(w.expiresAt)}`, text: 'Window closed: templates only' })
        : el('span', { title: 'The customer has not written to this number', text: 'Window closed: templates only' }));
    }
  }

  const TICKS = {
    scheduled: ['◷', 'Scheduled'], accepted: ['◷', 'Queued'], queued: ['◷', 'Queued'], sending: ['✓', 'Sending'],
    sent: ['✓', 'Sent'], delivered: ['✓✓', 'Delivered'], read: ['✓✓', 'Read'],
    failed: ['!', 'Failed'], undelivered: ['!', 'Not delivered'], canceled: ['×', 'Canceled'],
  };

  // An attachment: inbound media is shown from the gateway's copy (/api/v1/media/{id}, which
  // the session cookie opens) once fetched, with its state until then; outbound media from
  // the sender's own URL.
  function mediaItem(x) {
    const type = x.content_type || 'file';
    if (x.id && x.status !== 'stored') {
      return x.status === 'failed'
        ? el('span', { class: 'media-state failed', 'data-media-status': 'failed', text: `Attachment (${type}) could not be fetched${x.error ? ': ' + x.error : ''}` })
        : el('span', { class: 'media-state', 'data-media-status': 'pending', text: `Fetching attachment (${type})…` });
    }
    const href = x.download_url || x.url;
    return type.startsWith('image/')
      ? el('a', { href, target: '_blank', rel: 'noopener noreferrer' }, el('img', { src: href, alt: 'Image attachment', loading: 'lazy' }))
      : el('a', { href, target: '_blank', rel: 'noopener noreferrer', text: `Attachment (${type})` });
  }

  function messageItem(m) {
    const li = el('li', { class: `msg ${m.direction}`, 'data-message-id': m.id, id: 'm-' + m.id });
    if (m.media && m.media.length) li.append(el('div', { class: 'media' }, ...m.media.map(mediaItem)));
    if (m.body) li.append(el('div', { class: 'msg-body', text: m.body }));
    const meta = el('div', { class: 'msg-meta' }, el('time', { datetime: m.created_at, title: fullTime(m.created_at), text: shortTime(m.created_at) }));
    if (m.language) {
      meta.append(el('span', {
        class: 'lang', lang: 'en', 'data-language': m.language,
        title: `Detected language: ${languageName(m.language)} (confidence ${Math.round(m.language_confidence * 100)} %)`,
        text: m.language.toUpperCase(),
      }));
    }
    if (m.direction === 'outbound') {
      const [glyph, label] = TICKS[m.status] || ['·', m.status];
      meta.append(el('span', { class: 'ticks', 'data-status': m.status, title: label, 'aria-label': label, text: glyph }));
    }
    li.append(meta);
    if (m.status === 'failed' || m.status === 'undelivered') {
      const reason = [m.error_code && `Twilio error ${m.error_code}`, m.error_message].filter(Boolean).join(': ');
      li.append(el('div', { class: 'msg-error', text: reason || 'The message could not be delivered.' }));
    }
    if (state.highlight === m.id) li.classList.add('highlight');
    return li;
  }

  // Adds or replaces a message of the open conversation, keeping creation order.
  function addMessage(m) {
    const old = state.messages.get(m.id);
    if (old && Date.parse(old.updated_at) > Date.parse(m.updated_at)) return;
    state.messages.set(m.id, m);
    const node = messageItem(m);
    const existing = $('m-' + m.id);
    if (existing) { existing.replaceWith(node); return; }
    const after = [...messagesEl.children].find((li) => {
      const other = state.messages.get(li.dataset.messageId);
      return other && other.created_at.localeCompare(m.created_at) > 0;
    });
    messagesEl.insertBefore(node, after || null);
  }

  function scrollToEnd() {
    const target = state.highlight && $('m-' + state.highlight);
    if (target) target.scrollIntoView({ block: 'center' });
    else messagesEl.scrollTop = messagesEl.scrollHeight;
  }

  // ---------------------------------------------------------------- typing

  function showTyping(agent, typing) {
    clearTimeout(state.typingTimers.get(agent));
    state.typingTimers.delete(agent);
    // Someone who stopped announcing is taken to have stopped after 8 s.
    if (typing) state.typingTimers.set(agent, setTimeout(() => clearTyping(agent), 8000));
    renderTyping();
  }

  function clearTyping(agent) {
    clearTimeout(state.typingTimers.get(agent));
    state.typingTimers.delete(agent);
    renderTyping();
  }

  function renderTyping() {
    const names = [...state.typingTimers.keys()];
    $('typing').textContent = names.length === 0 ? ''
      : names.length === 1 ? `${names[0]} is typing…` : `${names.join(', ')} are typing…`;
  }

  function announceTyping(typing) {
    const c = state.current;
    if (!c) return;
    state.lastTypingSent = typing ? Date.now() : 0;
    api(`/api/v1/conversations/${c.id}/typing`, { method: 'POST', body: { typing } }).catch(() => {});
  }

  // ---------------------------------------------------------------- composer

  const compose = $('compose');
  let counterTimer = null;
  let counterSeq = 0;

  function updateCounter() {
    clearTimeout(counterTimer);
    counterTimer = setTimeout(async () => {
      const body = compose.value;
      const seq = ++counterSeq;
      if (!body) {
        $('counter').textContent = '';
        $('ucs2-warning').hidden = true;
        return;
      }
      try {
        const s = await api('/api/v1/segments', { method: 'POST', body: { body } });
        if (seq !== counterSeq) return;
        $('counter').textContent = `${s.characters} characters · ${s.encoding} · ${s.segments} segment${s.segments === 1 ? '' : 's'}`;
        const warn = $('ucs2-warning');
        warn.hidden = s.encoding !== 'UCS-2';
        warn.textContent = s.encoding === 'UCS-2'
          ? `⚠ Sent as UCS-2 (70 characters per segment) because of: ${s.non_gsm_characters.join(' ')}`
          : '';
      } catch (e) {
        if (seq === counterSeq) $('counter').textContent = e.message;
      }
    }, 200);
  }

  const REFUSALS = {
    opted_out: 'Not sent: this number opted out (replied STOP). It must text START before you can write again.',
    whatsapp_window_closed: 'Not sent: the WhatsApp 24-hour window is closed. Only an approved template can be sent now.',
  };

  function showError(e) {
    const box = $('composer-error');
    box.textContent = REFUSALS[e.code] || `Not sent: ${e.message}`;
    box.hidden = false;
  }

  async function send() {
    const c = state.current;
    const body = compose.value.trim();
    if (!c || !body) return;
    $('composer-error').hidden = true;
    // Known closed (the API's whatsapp_window): say so without a request the gateway would
    // refuse. An open window is checked again by the gateway when the message is queued.
    const w = windowState();
    if (w && !w.open) { showError({ code: 'whatsapp_window_closed' }); return; }
    state.idempotencyKey = state.idempotencyKey || crypto.randomUUID();
    const button = $('send');
    button.disabled = true;
    try {
      const m = await api('/api/v1/messages', {
        method: 'POST',
        headers: { 'Idempotency-Key': state.idempotencyKey },
        body: { to: c.counterpart, channel: c.channel, from: c.sender, body },
      });
      state.idempotencyKey = null;
      compose.value = '';
      updateCounter();
      announceTyping(false);
      if (state.current && state.current.id === m.conversation_id) {
        addMessage(m);
        messagesEl.scrollTop = messagesEl.scrollHeight;
      }
    } catch (e) {
      // A refusal will be refused again: the next attempt is a new message.
      if (e.status === 422) state.idempotencyKey = null;
      showError(e);
    } finally {
      button.disabled = false;
      compose.focus();
    }
  }

  compose.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  compose.addEventListener('input', () => {
    state.idempotencyKey = null;
    updateCounter();
    if (Date.now() - state.lastTypingSent > 3000) announceTyping(true);
    clearTimeout(state.typingIdle);
    state.typingIdle = setTimeout(() => { if (state.lastTypingSent) announceTyping(false); }, 4000);
  });
  $('composer').addEventListener('submit', (e) => { e.preventDefault(); send(); });

  // ---------------------------------------------------------------- search

  let searchTimer = null;

  async function search(q) {
    const box = $('search-results');
    if (!q.trim()) { box.hidden = true; return; }
    let page;
    try {
      page = await api('/api/v1/search?' + new URLSearchParams({ q, limit: '20' }));
    } catch (e) {
      $('search-list').replaceChildren(el('li', { class: 'muted empty-list', text: `Search failed: ${e.message}` }));
      box.hidden = false;
      return;
    }
    $('search-title').textContent = page.data.length ? `Results for “${q}”` : `Nothing found for “${q}”`;
    $('search-list').replaceChildren(...page.data.map(resultItem));
    box.hidden = false;
  }

  function resultItem(r) {
    const isMessage = r.type === 'message';
    const inbound = isMessage && r.message.direction === 'inbound';
    const title = isMessage
      ? (inbound ? 'From ' : 'To ') + (r.counterpart_name || (inbound ? r.message.from : r.message.to))
      : r.contact.display_name + ' · ' + r.contact.phone_number;
    const a = el('a', { href: r.conversation_id ? `/?c=${r.conversation_id}${isMessage ? '&m=' + r.id : ''}` : '/contacts#' + r.id, 'data-result-id': r.id },
      el('span', { class: 'result-kind', text: isMessage ? `Message · ${shortTime(r.message.created_at)}` : 'Contact' }),
      el('span', { class: 'conv-name', text: title }),
      el('span', { class: 'conv-preview' }, safeSnippet(r.snippet_html)));
    a.addEventListener('click', (e) => {
      if (!r.conversation_id) return;
      e.preventDefault();
      openConversation(r.conversation_id, isMessage ? r.id : null).catch(showError);
    });
    return el('li', {}, a);
  }

  $('search').addEventListener('input', (e) => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => search(e.target.value), 250);
  });
  $('search-form').addEventListener('submit', (e) => { e.preventDefault(); clearTimeout(searchTimer); search($('search').value); });
  $('search-clear').addEventListener('click', () => { $('search').value = ''; $('search-results').hidden = true; $('search').focus(); });

  // ---------------------------------------------------------------- events

  function onEvent(type, ev) {
    const d = ev.data;
    const c = state.current;
    switch (type) {
      case 'message.created':
      case 'message.status':
        if (c && d.message.conversation_id === c.id) addMessage(d.message);
        if (type === 'message.created' && c && d.message.conversation_id === c.id && d.message.direction === 'inbound') {
          messagesEl.scrollTop = messagesEl.scrollHeight;
          // Seen at once by the agent who has it open.
          if (document.visibilityState === 'visible') api(`/api/v1/conversations/${c.id}/read`, { method: 'POST' }).catch(() => {});
        }
        break;
      case 'conversation.updated': {
        const conv = d.conversation;
        if (c && conv.id === c.id) { state.current = conv; renderHeader(); }
        state.conversations.set(conv.id, conv);
        renderList();
        break;
      }
      case 'typing':
        if (c && ev.conversation_id === c.id && d.agent !== me) showTyping(d.agent, d.typing);
        break;
      case 'contact.updated':
        loadConversations().catch(() => {});
        break;
    }
  }

  function connectEvents() {
    const es = new EventSource('/api/v1/events');
    for (const type of ['message.created', 'message.status', 'conversation.updated', 'typing', 'contact.updated']) {
      es.addEventListener(type, (e) => onEvent(type, JSON.parse(e.data)));
    }
    // Too far behind: reload what is shown; EventSource reconnects from the resync cursor.
    es.addEventListener('resync', () => {
      loadConversations().catch(() => {});
      if (state.current) openConversation(state.current.id).catch(() => {});
    });
    window.addEventListener('pagehide', () => es.close());
  }

  // ---------------------------------------------------------------- simulator panel

  const simForm = $('simulator-form');
  if (simForm) {
    simForm.addEventListener('submit', async (e) => {
      e.preventDefault();
      const status = $('sim-status');
      status.textContent = 'Sending…';
      try {
        await api('/simulator/inbound', {
          method: 'POST',
          body: { from: $('sim-from').value.trim(), channel: $('sim-channel').value, body: $('sim-body').value },
        });
        status.textContent = 'Delivered to the gateway. It appears in the list above.';
      } catch (err) {
        status.textContent = `Failed: ${err.message}`;
      }
    });
  }

  // ---------------------------------------------------------------- start

  $('filter-channel').addEventListener('change', () => loadConversations().catch(showError));
  $('filter-unread').addEventListener('change', () => loadConversations().catch(showError));
  $('back').addEventListener('click', closeConversation);
  document.addEventListener('keydown', (e) => {
    const typingInField = /^(INPUT|TEXTAREA|SELECT)$/.test(document.activeElement.tagName);
    if (e.key === '/' && !typingInField) { e.preventDefault(); $('search').focus(); }
    if (e.key === 'Escape') {
      if (document.activeElement === $('search') && $('search').value) { $('search-clear').click(); return; }
      if (state.current) { const id = state.current.id; closeConversation(); const link = listEl.querySelector(`[data-id="${id}"]`); if (link) link.focus(); }
    }
  });
  connectEvents();
  const params = new URLSearchParams(location.search);
  loadConversations()
    .then(() => params.get('c') && openConversation(params.get('c'), params.get('m')))
    .catch(showError);
})();
