/*
 * Served as _static/offline/widgets-offline.js (copied by scripts/build_book.sh).
 * myst-nb loads it (nb_ipywidgets_js in _config.yml) on pages that hold ipywidgets state,
 * after require.js and before @jupyter-widgets/html-manager's embed-amd.js.
 */
(function () {
  "use strict";
  // Folder this script is served from: .../_static/offline/
  var here = document.currentScript.src.replace(/[^/]*$/, "");

  // 1. embed-amd.js sets webpack's publicPath (where its Font Awesome files are) from the AMD
  //    URL of "@jupyter-widgets/html-manager/dist/libembed-amd", which RequireJS resolves
  //    against the page's folder by default. Point that module path at the served copy.
  window.require.config({
    paths: { "@jupyter-widgets/html-manager/dist": here + "html-manager" },
  });

  // 2. @jupyter-widgets/base 6 typesets widget descriptions with the MathJax 2 API
  //    (MathJax.Hub.Queue(["Typeset", MathJax.Hub, element])); the book serves MathJax 3,
  //    where that throws "Cannot read properties of undefined (reading 'Queue')".
  //    Translate those calls to MathJax 3. This listener is registered before embed-amd.js's
  //    own "load" listener, so it runs before any widget is rendered.
  function typeset(MJ, element) {
    MJ.startup.promise
      .then(function () {
        return MJ.typesetPromise(element ? [element] : undefined);
      })
      .catch(function (err) {
        console.warn("MathJax 3 typesetting of a widget failed:", err);
      });
  }
  window.addEventListener("load", function () {
    var MJ = window.MathJax;
    if (!MJ || MJ.Hub || !MJ.startup) return;  // no MathJax 3 on this page
    MJ.Hub = {
      Queue: function () {
        for (var i = 0; i < arguments.length; i++) {
          var job = arguments[i];
          if (Array.isArray(job) && job[0] === "Typeset") typeset(MJ, job[2]);
          else if (typeof job === "function") job();
        }
      },
    };
  });
})();
