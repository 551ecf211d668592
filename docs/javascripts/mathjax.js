// MathJax 3 settings, read when the MathJax script (next in mkdocs.yml's extra_javascript) loads.
// pymdownx.arithmatex (generic mode) writes inline maths as \( \) and display maths as \[ \];
// the notebooks' markdown cells (mkdocs-jupyter) keep $ $ and $$ $$. Code and pre are skipped.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
};
