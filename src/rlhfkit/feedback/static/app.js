// Annotation page behaviour: drag-to-order for rankings and keyboard shortcuts. Plain JS, no build.
// Everything here only fills in the form; the server validates every answer.
(function () {
  "use strict";
  var form = document.getElementById("answer");

  // ---- ranking: pointer drag (mouse, pen, touch), buttons, Alt+Arrow keys ----------------------
  var list = document.getElementById("ranklist");
  if (list) {
    var orderField = document.getElementById("order");
    var sync = function () {
      var cards = Array.prototype.slice.call(list.children);
      orderField.value = cards.map(function (c) { return c.dataset.id; }).join(",");
      cards.forEach(function (c, i) { c.querySelector(".pos").textContent = String(i + 1); });
    };
    var move = function (card, dir) {
      if (dir < 0 && card.previousElementSibling) list.insertBefore(card, card.previousElementSibling);
      if (dir > 0 && card.nextElementSibling) list.insertBefore(card.nextElementSibling, card);
      card.focus();
      sync();
    };
    var dragging = null;
    list.addEventListener("pointerdown", function (e) {
      var card = e.target.closest(".rankcard");
      if (!card || e.target.closest("button") || e.button !== 0) return;
      dragging = card;
      card.classList.add("dragging");
      card.setPointerCapture(e.pointerId);
      e.preventDefault();
    });
    list.addEventListener("pointermove", function (e) {
      if (!dragging) return;
      var cards = Array.prototype.slice.call(list.children);
      for (var i = 0; i < cards.length; i++) {
        var c = cards[i];
        if (c === dragging) continue;
        var r = c.getBoundingClientRect();
        if (e.clientY >= r.top && e.clientY <= r.bottom) {
          // Above the middle of the card under the pointer: go before it; below: after it.
          list.insertBefore(dragging, e.clientY < r.top + r.height / 2 ? c : c.nextElementSibling);
          sync();
          break;
        }
      }
    });
    var end = function () {
      if (!dragging) return;
      dragging.classList.remove("dragging");
      dragging = null;
      sync();
    };
    list.addEventListener("pointerup", end);
    list.addEventListener("pointercancel", end);
    list.addEventListener("click", function (e) {
      var b = e.target.closest("button.move");
      if (b) move(b.closest(".rankcard"), b.classList.contains("up") ? -1 : 1);
    });
    list.addEventListener("keydown", function (e) {
      var card = e.target.closest(".rankcard");
      if (!card || !e.altKey) return;
      if (e.key === "ArrowUp") { e.preventDefault(); move(card, -1); }
      if (e.key === "ArrowDown") { e.preventDefault(); move(card, 1); }
    });
    sync();
  }

  // ---- keyboard shortcuts ------------------------------------------------------------------------
  var submit = function () {
    var btn = document.getElementById("submit");
    if (form && btn) form.requestSubmit(btn);
  };
  document.addEventListener("keydown", function (e) {
    if (e.defaultPrevented || e.isComposing) return;
    var typing = e.target.matches && e.target.matches("textarea, input[type=text], input[type=password], input:not([type])");
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { e.preventDefault(); submit(); return; }
    if (typing || e.altKey || e.ctrlKey || e.metaKey) return;
    var k = e.key.toLowerCase();
    if (/^[1-9]$/.test(k)) {
      var radio = document.querySelector('input[name=rating][data-digit="' + k + '"]');
      if (radio) { radio.checked = true; radio.focus(); e.preventDefault(); }
      return;
    }
    if (k === "enter") {
      if (e.target.matches && e.target.matches("button, a, summary")) return;  // let those act themselves
      e.preventDefault();
      submit();
      return;
    }
    var target = document.querySelector('[data-key="' + k + '"]');
    if (target) { e.preventDefault(); target.click(); }
  });

  document.documentElement.dataset.ready = "1";   // tests wait for this before pressing keys

  // A second click while the first POST is in flight would only be a duplicate (stored once anyway).
  document.querySelectorAll("form").forEach(function (f) {
    f.addEventListener("submit", function () {
      setTimeout(function () { f.querySelectorAll("button").forEach(function (b) { b.disabled = true; }); }, 0);
    });
  });
})();
