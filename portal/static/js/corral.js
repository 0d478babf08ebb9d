// Corral's only script of its own. Confirmation questions live in data-confirm
// attributes (HTML-escaped text, never JavaScript), so no user data is ever
// inside inline JavaScript. Delegated on the document in the capture phase:
// it runs before htmx's own submit handling and covers forms that htmx swaps
// in later.
(function () {
  "use strict";
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-confirm")) {
      return;
    }
    if (!window.confirm(form.getAttribute("data-confirm"))) {
      event.preventDefault();
      event.stopImmediatePropagation();
    }
  }, true);
})();
