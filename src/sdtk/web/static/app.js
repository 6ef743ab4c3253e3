// sdtk serve: the little behaviour htmx does not cover. No inline handlers (the CSP forbids
// them): everything is delegated from the document.
(function () {
  "use strict";
  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest("button.copy");
    if (!btn) return;
    var text = btn.getAttribute("data-copy") || "";
    var done = function () { var old = btn.textContent; btn.textContent = "Copied"; setTimeout(function () { btn.textContent = old; }, 1200); };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { fallback(text); done(); });
    } else { fallback(text); done(); }
  });
  function fallback(text) {
    var ta = document.createElement("textarea");
    ta.value = text; ta.setAttribute("readonly", ""); ta.className = "sr-only";
    document.body.appendChild(ta); ta.select();
    try { document.execCommand("copy"); } catch (e) { /* nothing to do */ }
    document.body.removeChild(ta);
  }
  // block-weight sliders: show each value; a preset fills them; moving one makes it "custom"
  document.addEventListener("input", function (ev) {
    var el = ev.target;
    if (el.classList && el.classList.contains("block")) {
      var out = document.getElementById(el.getAttribute("data-output"));
      if (out) out.textContent = el.value;
      var preset = document.getElementById("block_preset");
      if (preset && !el.dataset.fromPreset) preset.value = "";
    }
  });
  document.addEventListener("change", function (ev) {
    var el = ev.target;
    if (el.id === "block_preset" && el.value) {
      var presets = JSON.parse(el.getAttribute("data-presets") || "{}");
      var values = presets[el.value] || [];
      values.forEach(function (v, i) {
        var s = document.getElementById("block_" + i);
        if (!s) return;
        s.dataset.fromPreset = "1"; s.value = v; delete s.dataset.fromPreset;
        var out = document.getElementById("bv_" + i); if (out) out.textContent = Math.round(v * 1000) / 1000;
      });
      var use = document.getElementById("use_blocks"); if (use) use.checked = true;
    }
    if (el.id === "method") {
      var info = JSON.parse(el.getAttribute("data-info") || "{}")[el.value];
      var alpha = document.getElementById("alpha");
      if (info && alpha) alpha.value = info.alpha;
    }
  });
})();
