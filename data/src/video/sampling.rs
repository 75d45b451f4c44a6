//! Which frames to take from a video (LongVILA samples uniformly:
//! `round(linspace(0, n-1, N))`; LongVILA-R1 also samples every 1/fps seconds).
//!
//! Frame indices count frames in presentation order from 0. Rounding is numpy's
//! (half to even), so the indices equal those of the Python reference exactly.

use crate::error::DataError;

/// A frame-sampling strategy.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// `count` frames spread uniformly over the whole video, first and last included.
    Uniform { count: usize },
    /// One frame every `1 / fps` seconds from the start, at most `max` frames (spread
    /// uniformly over the video when there would be more).
    Fps { fps: f64, max: usize },
    /// The frames shown at these times (seconds from the first frame).
    Timestamps(Vec<f64>),
}

/// What to do when a video has fewer frames than asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShortVideo {
    /// Repeat frames as `round(linspace)` does (LongVILA's behaviour): the result
    /// always has the requested count, some indices twice.
    #[default]
    Repeat,
    /// Return each available frame once (fewer frames than asked).
    Truncate,
    /// Refuse with [`DataError::TooFewFrames`].
    Error,
}

/// numpy's `round` (half to even).
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// `round(linspace(0, n - 1, count))` as numpy computes it.
pub fn uniform_indices(n: usize, count: usize) -> Vec<usize> {
    if n == 0 || count == 0 {
        return Vec::new();
    }
    if count == 1 {
        return vec![0];
    }
    let last = (n - 1) as f64;
    let step = last / (count - 1) as f64;
    (0..count)
        .map(|i| {
            // numpy: start + i * step, with the last sample set exactly to stop.
            let x = if i == count - 1 {
                last
            } else {
                i as f64 * step
            };
            round_half_even(x) as usize
        })
        .collect()
}

impl Sampling {
    /// Frame indices to decode, in presentation order (ascending; repeated indices
    /// possible with [`ShortVideo::Repeat`]).
    ///
    /// `frames` is the video's frame count and `fps` its average frame rate.
    pub fn indices(
        &self,
        frames: usize,
        fps: f64,
        short: ShortVideo,
    ) -> Result<Vec<usize>, DataError> {
        if frames == 0 {
            return Err(DataError::Empty);
        }
        let indices = match self {
            Sampling::Uniform { count } => {
                if *count == 0 {
                    return Err(DataError::Sampling(
                        "Uniform { count: 0 }: ask for at least one frame".into(),
                    ));
                }
                if *count > frames {
                    match short {
                        ShortVideo::Repeat => uniform_indices(frames, *count),
                        ShortVideo::Truncate => (0..frames).collect(),
                        ShortVideo::Error => {
                            return Err(DataError::TooFewFrames {
                                asked: *count,
                                available: frames,
                            });
                        }
                    }
                } else {
                    uniform_indices(frames, *count)
                }
            }
            Sampling::Fps { fps: every, max } => {
                if !(every.is_finite() && *every > 0.0) || *max == 0 {
                    return Err(DataError::Sampling(format!(
                        "Fps {{ fps: {every}, max: {max} }}: fps must be > 0 and max >= 1"
                    )));
                }
                if !(fps.is_finite() && fps > 0.0) {
                    return Err(DataError::Sampling(format!(
                        "the video reports frame rate {fps}; use Uniform sampling"
                    )));
                }
                let duration = frames as f64 / fps;
                let wanted = ((duration * every).floor() as usize).max(1);
                if wanted > *max {
                    uniform_indices(frames, *max)
                } else {
                    (0..wanted)
                        .map(|i| ((i as f64 / every * fps).round() as usize).min(frames - 1))
                        .collect()
                }
            }
            Sampling::Timestamps(times) => {
                if times.is_empty() {
                    return Err(DataError::Sampling("Timestamps: empty list".into()));
                }
                let mut out = Vec::with_capacity(times.len());
                for &t in times {
                    let duration = frames as f64 / fps;
                    if !(t.is_finite() && t >= 0.0 && t < duration) {
                        return Err(DataError::Sampling(format!(
                            "timestamp {t}s is outside the video (0 to {duration:.3}s)"
                        )));
                    }
                    out.push(((t * fps).floor() as usize).min(frames - 1));
                }
                out.sort_unstable();
                out
            }
        };
        Ok(indices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_matches_numpy_round_linspace() {
        // np.round(np.linspace(0, 9, 4)) = [0, 3, 6, 9]
        assert_eq!(uniform_indices(10, 4), vec![0, 3, 6, 9]);
        // np.round(np.linspace(0, 4, 9)) = [0, 0, 1, 2, 2, 2, 3, 4, 4] (0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4)
        assert_eq!(uniform_indices(5, 9), vec![0, 0, 1, 2, 2, 2, 3, 4, 4]);
        // np.round(np.linspace(0, 107999, 1024))[:3] = [0, 106, 211] and the last is 107999
        let idx = uniform_indices(108_000, 1024);
        assert_eq!(&idx[..3], &[0, 106, 211]);
        assert_eq!(*idx.last().unwrap(), 107_999);
        assert_eq!(uniform_indices(7, 1), vec![0]);
    }

    #[test]
    fn short_video_policies() {
        let s = Sampling::Uniform { count: 8 };
        assert_eq!(s.indices(3, 30.0, ShortVideo::Repeat).unwrap().len(), 8);
        assert_eq!(
            s.indices(3, 30.0, ShortVideo::Truncate).unwrap(),
            vec![0, 1, 2]
        );
        let err = s.indices(3, 30.0, ShortVideo::Error).unwrap_err();
        assert!(
            err.to_string().contains("8") && err.to_string().contains("3"),
            "{err}"
        );
        assert!(matches!(
            s.indices(0, 30.0, ShortVideo::Repeat),
            Err(DataError::Empty)
        ));
    }

    #[test]
    fn fps_and_timestamps() {
        // 10 s at 30 fps, one frame a second: frames 0, 30, ..., 270.
        let idx = Sampling::Fps { fps: 1.0, max: 100 }
            .indices(300, 30.0, ShortVideo::Repeat)
            .unwrap();
        assert_eq!(idx, (0..10).map(|i| i * 30).collect::<Vec<_>>());
        // Capped: 4 frames spread over the video.
        let idx = Sampling::Fps { fps: 1.0, max: 4 }
            .indices(300, 30.0, ShortVideo::Repeat)
            .unwrap();
        assert_eq!(idx, vec![0, 100, 199, 299]);
        let idx = Sampling::Timestamps(vec![2.0, 0.5])
            .indices(300, 30.0, ShortVideo::Repeat)
            .unwrap();
        assert_eq!(idx, vec![15, 60]);
        let err = Sampling::Timestamps(vec![11.0])
            .indices(300, 30.0, ShortVideo::Repeat)
            .unwrap_err();
        assert!(err.to_string().contains("11s"), "{err}");
    }
}
