// devmeter console: progressive enhancement only. Every action also works without script:
// forms post normally and the server asks for the deactivate confirmation on its own page.
// Loaded from a file because the Content-Security-Policy allows no inline script.
(function () {
  "use strict";

  var pending = null;

  function say(message, isError) {
    var flash = document.getElementById("flash");
    if (!flash) {
      return;
    }
    flash.textContent = message;
    flash.classList.toggle("flash-error", Boolean(isError));
    flash.setAttribute("role", isError ? "alert" : "status");
    flash.hidden = false;
  }

  function tokenOf(form) {
    var input = form.querySelector('input[name="csrf_token"]');
    return input ? input.value : "";
  }

  function describe(form) {
    var id = form.dataset.deviceId || "";
    var name = form.dataset.deviceName || "";
    return name ? id + " (" + name + ")" : id;
  }

  function setBusy(form, busy) {
    form.querySelectorAll("button").forEach(function (button) {
      button.disabled = busy;
    });
    form.setAttribute("aria-busy", busy ? "true" : "false");
  }

  // Post the form with fetch and swap in the row the server renders for the new state.
  async function sendInPlace(form, extra) {
    var body = new URLSearchParams(new FormData(form));
    Object.keys(extra || {}).forEach(function (name) {
      body.set(name, extra[name]);
    });
    var target = document.getElementById(form.dataset.replace);
    setBusy(form, true);
    var response;
    var text;
    try {
      response = await fetch(form.action, {
        method: "POST",
        body: body,
        credentials: "same-origin",
        headers: { "X-CSRF-Token": tokenOf(form), "X-Console-Fragment": "row" },
      });
      text = await response.text();
    } catch (error) {
      setBusy(form, false);
      say("Network error: the change may not have been made. Reload the page to check.", true);
      return;
    }
    if (response.status === 401) {
      window.location.assign("/console/sign-in");
      return;
    }
    if (!response.ok) {
      setBusy(form, false);
      say(text || "The change failed (HTTP " + response.status + ").", true);
      return;
    }
    var template = document.createElement("template");
    template.innerHTML = text.trim();
    var row = template.content.firstElementChild;
    if (!target || !row) {
      window.location.reload();
      return;
    }
    target.replaceWith(row);
    var next = row.querySelector("button");
    if (next) {
      next.focus();
    }
    say("Device " + (row.dataset.deviceId || "") + " is now " + (row.dataset.state || "") + ".", false);
  }

  function proceed(form) {
    if (form.dataset.replace) {
      sendInPlace(form, { confirm: "yes" });
      return;
    }
    var confirmed = document.createElement("input");
    confirmed.type = "hidden";
    confirmed.name = "confirm";
    confirmed.value = "yes";
    form.appendChild(confirmed);
    form.submit();
  }

  function askToDeactivate(form) {
    var dialog = document.getElementById("confirm-dialog");
    if (!dialog || typeof dialog.showModal !== "function") {
      // No <dialog>: the plain post gets the server's confirmation page instead.
      form.submit();
      return;
    }
    document.getElementById("confirm-dialog-text").textContent =
      "Deactivate device " + describe(form) + "?";
    pending = form;
    dialog.showModal();
    document.getElementById("confirm-deactivate").focus();
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!(form instanceof HTMLFormElement)) {
      return;
    }
    if (form.dataset.confirm === "deactivate") {
      event.preventDefault();
      askToDeactivate(form);
    } else if (form.dataset.replace) {
      event.preventDefault();
      sendInPlace(form, null);
    }
  });

  function wireDialog() {
    var dialog = document.getElementById("confirm-dialog");
    if (!dialog) {
      return;
    }
    document.getElementById("confirm-deactivate").addEventListener("click", function () {
      var form = pending;
      pending = null;
      dialog.close("confirm");
      if (form) {
        proceed(form);
      }
    });
    document.getElementById("cancel-deactivate").addEventListener("click", function () {
      dialog.close("cancel");
    });
    dialog.addEventListener("close", function () {
      pending = null;
    });
  }

  async function copy(button) {
    var source = document.getElementById(button.dataset.copyTarget);
    if (!source) {
      return;
    }
    var text = "value" in source ? source.value : source.textContent;
    var copied = false;
    try {
      await navigator.clipboard.writeText(text);
      copied = true;
    } catch (error) {
      // Clipboard API missing (plain http) or denied: fall back to a selection copy.
      if (typeof source.select === "function") {
        source.select();
      }
      try {
        copied = document.execCommand("copy");
      } catch (ignored) {
        copied = false;
      }
    }
    button.textContent = copied ? "Copied" : "Copy key";
    say(copied ? "Key copied to the clipboard." : "Could not copy: the key is selected, press Ctrl+C.", !copied);
  }

  function wireCopyButtons() {
    document.querySelectorAll("[data-copy-target]").forEach(function (button) {
      button.addEventListener("click", function () {
        copy(button);
      });
    });
  }

  // The open month's usage keeps moving while devices report: re-read the page in the
  // background and swap in its content, only while the tab is shown. A failed read keeps what
  // is there; the next tick tries again.
  function wireLiveRefresh() {
    var marker = document.querySelector("[data-refresh-seconds]");
    if (!marker) {
      return;
    }
    var seconds = Math.max(5, Number(marker.dataset.refreshSeconds) || 30);
    setInterval(async function () {
      var current = document.getElementById("main");
      if (document.visibilityState !== "visible" || !current || current.contains(document.activeElement)) {
        return;
      }
      try {
        var response = await fetch(window.location.href, { credentials: "same-origin" });
        if (!response.ok) {
          return;
        }
        var fresh = new DOMParser().parseFromString(await response.text(), "text/html").getElementById("main");
        if (fresh) {
          current.replaceWith(fresh);
        }
      } catch (ignored) {
        // Offline for a moment: keep the page as it is.
      }
    }, seconds * 1000);
  }

  wireDialog();
  wireCopyButtons();
  wireLiveRefresh();
})();
