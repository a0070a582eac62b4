// The microphone, recorded to a WAV file in the page: the browser's audio samples (mono, the device's rate) as
// 16-bit PCM, which the instance decodes like any uploaded WAV (browsers record WebM/Opus natively, which
// libsndfile does not read). Needs a secure context (https, or localhost / 127.0.0.1).

export function micAvailable() {
  return Boolean(window.isSecureContext && navigator.mediaDevices?.getUserMedia);
}

// Start recording; onLevel(seconds) is called as samples arrive. Resolves to { stop }: stop() resolves to a WAV Blob.
export async function record(onLevel) {
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
  const context = new AudioContext();
  const source = context.createMediaStreamSource(stream);
  const tap = context.createScriptProcessor(4096, 1, 1);
  const chunks = [];
  let count = 0;
  let stopped = false;
  tap.onaudioprocess = (event) => {
    if (stopped) return;  // a block the audio thread queued before stop(): not recorded, and no level after Stop
    const samples = new Float32Array(event.inputBuffer.getChannelData(0));
    chunks.push(samples);
    count += samples.length;
    onLevel?.(count / context.sampleRate);
  };
  source.connect(tap);
  tap.connect(context.destination);
  return {
    async stop() {
      stopped = true;
      tap.onaudioprocess = null;
      tap.disconnect();
      source.disconnect();
      for (const track of stream.getTracks()) track.stop();
      const rate = context.sampleRate;
      await context.close();
      return wav(chunks, count, rate);
    },
  };
}

function wav(chunks, count, rate) {
  const out = new DataView(new ArrayBuffer(44 + count * 2));
  const text = (at, s) => { for (let i = 0; i < s.length; i++) out.setUint8(at + i, s.charCodeAt(i)); };
  text(0, "RIFF"); out.setUint32(4, 36 + count * 2, true); text(8, "WAVE");
  text(12, "fmt "); out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
  out.setUint32(24, rate, true); out.setUint32(28, rate * 2, true); out.setUint16(32, 2, true);
  out.setUint16(34, 16, true); text(36, "data"); out.setUint32(40, count * 2, true);
  let at = 44;
  for (const chunk of chunks) {
    for (const x of chunk) {
      const clipped = Math.max(-1, Math.min(1, x));
      out.setInt16(at, clipped < 0 ? clipped * 0x8000 : clipped * 0x7fff, true);
      at += 2;
    }
  }
  return new Blob([out.buffer], { type: "audio/wav" });
}
