// edgert fleet console: live sections over Server-Sent Events, and confirmed actions.
// No framework, no build step: the server renders every section (escaped); this swaps them in.
(function () {
  "use strict";
  const badge = document.getElementById("live");
  const toast = document.getElementById("toast");
  window.edgertLoadedAt = Date.now(); // a reload would reset it (the browser tests check it stays)
  window.edgertUpdates = 0;

  function say(text, bad) {
    toast.textContent = text;
    toast.className = bad ? "show bad" : "show";
    clearTimeout(say.t);
    say.t = setTimeout(() => { toast.className = ""; }, 6000);
  }

  function connect() {
    const es = new EventSource(document.body.dataset.live);
    es.onopen = () => { badge.textContent = "live"; badge.className = "live-badge on"; };
    es.onerror = () => { badge.textContent = "reconnecting…"; badge.className = "live-badge off"; };
    es.onmessage = (e) => {
      const msg = JSON.parse(e.data);
      for (const [id, html] of Object.entries(msg.sections || {})) {
        const el = document.getElementById(id);
        if (!el) continue;
        const a = document.activeElement; // never swap a form the operator is filling in
        if (a && el.contains(a) && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName)) continue;
        el.innerHTML = html;
      }
      window.edgertUpdates += 1;
      badge.textContent = "live · " + new Date(msg.ts * 1000).toLocaleTimeString();
      document.dispatchEvent(new CustomEvent("edgert:update", { detail: msg }));
    };
  }
  if (window.EventSource) connect();

  const dialog = document.getElementById("confirm");
  async function post(url, body) {
    const r = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    let doc = {};
    try { doc = await r.json(); } catch (_) { doc = { error: r.statusText }; }
    return [r.status, doc];
  }

  document.addEventListener("click", (e) => {
    const b = e.target.closest("button.act");
    if (!b) return;
    e.preventDefault();
    const action = b.dataset.action, rollout = parseInt(b.dataset.rollout, 10);
    document.getElementById("confirm-text").textContent = b.dataset.confirm;
    dialog.returnValue = "";
    dialog.onclose = async () => {
      if (dialog.returnValue !== "ok") return;
      // A one-time ticket for this action on this rollout, then the action with it.
      let [status, doc] = await post("/actions/ticket", { action, rollout });
      if (status !== 200) { say(doc.error || ("refused: " + status), true); return; }
      [status, doc] = await post("/actions", { action, rollout, ticket: doc.ticket });
      say(status === 200 ? doc.message : (doc.error || ("refused: " + status)), status !== 200);
    };
    dialog.showModal();
  });
})();
