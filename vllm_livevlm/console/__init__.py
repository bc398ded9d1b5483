"""The live console's static page (`index.html`, `console.js`, `console.css`), served at `/livevlm/` by
`vllm_livevlm.serving.console`: plain HTML/CSS/JS, no build step, no CDN."""
