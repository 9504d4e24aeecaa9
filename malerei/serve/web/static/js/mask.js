// The source image of img2img/inpaint/outpaint/upscale/restore on a canvas, and the inpaint mask
// painted over it. The canvas keeps the image's own pixel size (CSS scales it), so the mask has
// exactly the image's size, as the API requires. Strokes are kept in a separate canvas in the
// overlay colour; the exported mask is white where painted (repaint) and black elsewhere (keep).

const OVERLAY = "rgb(255, 0, 170)";  // also in #binarize
const MAX_UNDO = 30;

export class SourceCanvas {
  constructor(canvas, { onChange = () => {} } = {}) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.mask = document.createElement("canvas");
    this.maskCtx = this.mask.getContext("2d", { willReadFrequently: true });
    this.image = null;
    this.painting = false;
    this.paintable = false;
    this.brush = 16;
    this.erase = false;
    this.undoStack = [];
    this.last = null;
    this.onChange = onChange;
    canvas.addEventListener("pointerdown", (e) => this.#down(e));
    canvas.addEventListener("pointermove", (e) => this.#move(e));
    for (const name of ["pointerup", "pointercancel", "lostpointercapture"]) {
      canvas.addEventListener(name, () => this.#up());
    }
  }

  get width() { return this.canvas.width; }
  get height() { return this.canvas.height; }

  setImage(image) {
    this.image = image;
    const w = image.naturalWidth || image.width;
    const h = image.naturalHeight || image.height;
    for (const c of [this.canvas, this.mask]) { c.width = w; c.height = h; }
    this.undoStack = [];
    this.draw();
    this.onChange();
  }

  setPaintable(on) {
    this.paintable = on;
    this.canvas.classList.toggle("paintable", on);
    this.draw();
  }

  draw() {
    const { ctx } = this;
    ctx.clearRect(0, 0, this.width, this.height);
    if (!this.image) return;
    ctx.drawImage(this.image, 0, 0, this.width, this.height);
    if (this.paintable) {
      ctx.save();
      ctx.globalAlpha = 0.6;
      ctx.drawImage(this.mask, 0, 0);
      ctx.restore();
    }
  }

  #point(e) {
    const rect = this.canvas.getBoundingClientRect();
    return { x: (e.clientX - rect.left) * (this.width / rect.width), y: (e.clientY - rect.top) * (this.height / rect.height) };
  }

  #snapshot() {
    this.undoStack.push(this.maskCtx.getImageData(0, 0, this.width, this.height));
    if (this.undoStack.length > MAX_UNDO) this.undoStack.shift();
  }

  #down(e) {
    if (!this.paintable || !this.image || e.button > 0) return;
    e.preventDefault();
    this.canvas.setPointerCapture(e.pointerId);
    this.#snapshot();
    this.painting = true;
    this.last = this.#point(e);
    this.#stroke(this.last, this.last);
  }

  #move(e) {
    if (!this.painting) return;
    const p = this.#point(e);
    this.#stroke(this.last, p);
    this.last = p;
  }

  #up() {
    if (!this.painting) return;
    this.painting = false;
    this.#binarize();
    this.draw();
    this.onChange();
  }

  // A pixel is painted or not: the soft edges of a stroke become solid or vanish, so erasing
  // over a stroke leaves nothing behind (the server blurs the mask edge, see mask_blur).
  #binarize() {
    const image = this.maskCtx.getImageData(0, 0, this.width, this.height);
    const { data } = image;
    for (let i = 0; i < data.length; i += 4) {
      const on = data[i + 3] >= 128;
      data[i] = 255; data[i + 1] = 0; data[i + 2] = 170; data[i + 3] = on ? 255 : 0;
    }
    this.maskCtx.putImageData(image, 0, 0);
  }

  #stroke(a, b) {
    const m = this.maskCtx;
    m.save();
    m.globalCompositeOperation = this.erase ? "destination-out" : "source-over";
    m.strokeStyle = OVERLAY;
    m.fillStyle = OVERLAY;
    m.lineWidth = this.brush;
    m.lineCap = "round";
    m.lineJoin = "round";
    m.beginPath();
    if (a.x === b.x && a.y === b.y) {
      m.arc(a.x, a.y, this.brush / 2, 0, Math.PI * 2);
      m.fill();
    } else {
      m.moveTo(a.x, a.y);
      m.lineTo(b.x, b.y);
      m.stroke();
    }
    m.restore();
    this.draw();
  }

  undo() {
    const previous = this.undoStack.pop();
    if (!previous) return false;
    this.maskCtx.putImageData(previous, 0, 0);
    this.draw();
    this.onChange();
    return true;
  }

  clear() {
    if (this.isMaskEmpty()) return;
    this.#snapshot();
    this.maskCtx.clearRect(0, 0, this.width, this.height);
    this.draw();
    this.onChange();
  }

  isMaskEmpty() {
    if (!this.width || !this.height) return true;
    const { data } = this.maskCtx.getImageData(0, 0, this.width, this.height);
    for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) return false;
    return true;
  }

  // The mask as a PNG data URL: white (repaint) where painted, black (keep) elsewhere.
  maskDataURL() {
    const out = document.createElement("canvas");
    out.width = this.width;
    out.height = this.height;
    const c = out.getContext("2d");
    c.drawImage(this.mask, 0, 0);
    c.globalCompositeOperation = "source-in";
    c.fillStyle = "#fff";
    c.fillRect(0, 0, out.width, out.height);
    c.globalCompositeOperation = "destination-over";
    c.fillStyle = "#000";
    c.fillRect(0, 0, out.width, out.height);
    return out.toDataURL("image/png");
  }
}

// Reads a File or Blob into {dataURL, image}; rejects with a readable message.
export function loadImageFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onerror = () => reject(new Error(`could not read ${file.name || "the file"}`));
    reader.onload = () => {
      const image = new Image();
      image.onload = () => resolve({ dataURL: reader.result, image });
      image.onerror = () => reject(new Error(`${file.name || "the file"} is not an image this browser can show (use PNG, JPEG or WebP)`));
      image.src = reader.result;
    };
    reader.readAsDataURL(file);
  });
}
