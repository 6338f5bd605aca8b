// regserve UI: copy buttons. Nothing else needs script; pages work without it.
"use strict";
document.addEventListener("click", async (event) => {
  const button = event.target.closest("button.copy");
  if (!button) return;
  const text = button.dataset.copy;
  const status = document.getElementById("status");
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
    } else {  // plain http to a host other than localhost: no Clipboard API
      const area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.style.position = "fixed";
      area.style.opacity = "0";
      document.body.appendChild(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    status.textContent = "Copied: " + text;
  } catch (err) {
    status.textContent = "Could not copy; select the text instead.";
  }
  setTimeout(() => { status.textContent = ""; }, 2500);
});
