// The chat page: streams answers from /v1/chat/completions (server-sent events) and sends thumbs and
// edits to /feedback/*. No framework, no inline script (the page's CSP forbids it).
"use strict";
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const feedbackOn = document.querySelector('meta[name="feedback"]').content === "on";
const log = document.getElementById("log");
const input = document.getElementById("input");
const send = document.getElementById("send");
const statusLine = document.getElementById("status");
const messages = [];  // the conversation as the API sees it

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const b = document.createElement("div");
  b.className = "bubble";
  b.dir = "auto";         // with the CSS's unicode-bidi: isolate, right-to-left text cannot reorder the page
  b.textContent = text;  // textContent, never innerHTML: model output is data, not markup
  div.appendChild(b);
  log.appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

async function postJSON(url, body) {
  const r = await fetch(url, {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf}, body: JSON.stringify(body)});
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || r.statusText);
  return data;
}

function addActions(div, context, index) {
  if (!feedbackOn) return;
  const bar = document.createElement("div");
  bar.className = "actions";
  const up = document.createElement("button"), down = document.createElement("button"),
        edit = document.createElement("button"), note = document.createElement("span");
  up.textContent = "▲ good"; up.title = "Good answer"; up.dataset.rating = "1"; up.className = "thumb-up";
  down.textContent = "▼ bad"; down.title = "Bad answer"; down.dataset.rating = "0"; down.className = "thumb-down";
  edit.textContent = "✎ edit"; edit.title = "Write a better answer"; edit.className = "edit";
  note.className = "note";
  for (const btn of [up, down]) {
    btn.addEventListener("click", async () => {
      up.disabled = down.disabled = true;
      try {
        await postJSON("/feedback/rate", {messages: context, completion: messages[index].content,
                                          rating: Number(btn.dataset.rating)});
        btn.classList.add("chosen");
        note.textContent = "Thanks, saved.";
      } catch (e) { up.disabled = down.disabled = false; statusLine.textContent = "Feedback failed: " + e.message; }
    });
  }
  edit.addEventListener("click", () => {
    const b = div.querySelector(".bubble");
    const box = document.createElement("div");
    box.className = "editor";
    const ta = document.createElement("textarea");
    ta.value = messages[index].content;
    const save = document.createElement("button"), cancel = document.createElement("button");
    save.textContent = "Save"; save.className = "save"; cancel.textContent = "Cancel";
    box.append(ta, document.createElement("br"), save, cancel);
    b.replaceWith(box);
    ta.focus();
    cancel.addEventListener("click", () => box.replaceWith(b));
    save.addEventListener("click", async () => {
      const edited = ta.value.trim();
      if (!edited) return;
      try {
        await postJSON("/feedback/edit", {messages: context, completion: messages[index].content, edited});
        messages[index].content = edited;  // the conversation continues with the corrected answer
        b.textContent = edited;
        box.replaceWith(b);
        note.textContent = "Edit saved.";
      } catch (e) { statusLine.textContent = "Edit failed: " + e.message; }
    });
  });
  bar.append(up, down, edit, note);
  div.appendChild(bar);
}

async function ask(text) {
  statusLine.textContent = "";
  messages.push({role: "user", content: text});
  bubble("user", text);
  const context = messages.map(m => ({...m}));
  const div = bubble("assistant", "");
  const b = div.querySelector(".bubble");
  send.disabled = true;
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({messages: context, stream: true})});
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const delta = JSON.parse(data).choices[0].delta.content || "";
        answer += delta;
        b.textContent = answer;
      }
    }
  } catch (e) {
    statusLine.textContent = "The model did not answer: " + e.message;
    div.remove();
    messages.pop();
    send.disabled = false;
    return;
  }
  messages.push({role: "assistant", content: answer});
  div.dataset.done = "1";
  addActions(div, context, messages.length - 1);
  send.disabled = false;
  input.focus();
}

document.getElementById("composer").addEventListener("submit", ev => {
  ev.preventDefault();
  const text = input.value.trim();
  if (text && !send.disabled) { input.value = ""; ask(text); }
});
input.addEventListener("keydown", ev => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); document.getElementById("composer").requestSubmit(); }
});
