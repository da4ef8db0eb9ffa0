/* scsnet QC page (qc.html): keyboard review of the axial slices.
 * j / ArrowDown / ArrowRight: next slice down the page (inferior); k / ArrowUp / ArrowLeft:
 * previous; o: region outlines on/off; w: the most compressed slice. Clicking a slice, a plot
 * point or a sagittal mark selects that slice. Only classes change: the page's Content-Security-
 * Policy allows no inline style, and this script is inlined byte for byte (its hash is the policy).
 */
(function () {
  "use strict";
  var cards = Array.prototype.slice.call(document.querySelectorAll("section.slice"));
  var status = document.getElementById("status");
  var current = -1;

  function mark(slice) {
    var marked = document.querySelectorAll(".current");
    for (var i = 0; i < marked.length; i++) { marked[i].classList.remove("current"); }
    var all = document.querySelectorAll('[data-slice="' + slice + '"]');
    for (var j = 0; j < all.length; j++) { all[j].classList.add("current"); }
  }

  function select(position, scroll) {
    if (cards.length === 0) { return; }
    current = Math.max(0, Math.min(cards.length - 1, position));
    var card = cards[current];
    mark(card.getAttribute("data-slice"));
    if (scroll) { card.scrollIntoView({ block: "center" }); }
    if (status) { status.textContent = "slice " + card.getAttribute("data-slice"); }
  }

  function worst() {
    for (var i = 0; i < cards.length; i++) {
      if (cards[i].classList.contains("worst")) { select(i, true); return; }
    }
  }

  function toggleOutlines() {
    document.body.classList.toggle("no-outlines");
  }

  function bySlice(slice) {
    for (var i = 0; i < cards.length; i++) {
      if (cards[i].getAttribute("data-slice") === slice) { return i; }
    }
    return -1;
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    var tag = event.target && event.target.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") { return; }
    var key = event.key;
    if (key === "j" || key === "ArrowDown" || key === "ArrowRight") {
      select(current < 0 ? 0 : current + 1, true);
    } else if (key === "k" || key === "ArrowUp" || key === "ArrowLeft") {
      select(current < 0 ? 0 : current - 1, true);
    } else if (key === "o") {
      toggleOutlines();
    } else if (key === "w") {
      worst();
    } else {
      return;
    }
    event.preventDefault();
  });

  document.addEventListener("click", function (event) {
    var target = event.target.closest ? event.target.closest("[data-slice]") : null;
    if (target) {
      var position = bySlice(target.getAttribute("data-slice"));
      if (position >= 0) { select(position, false); }
    }
  });

  var toggle = document.getElementById("toggle-outlines");
  if (toggle) { toggle.addEventListener("click", toggleOutlines); }
  var goWorst = document.getElementById("go-worst");
  if (goWorst) { goWorst.addEventListener("click", worst); }
})();
