//! Which frames to take from a video (LongVILA samples uniformly:
//! `round(linspace(0, n-1, N))`; LongVILA-R1 also samples every 1/fps seconds).
//!
//! Frame indices count frames in presentation order from 0. Uniform sampling rounds
//! as numpy does (half to even), so its indices equal those of the Python reference
//! exactly; `Fps` sampling rounds a time's frame position half up (12.5 -> 13).

use crate::error::DataError;

/// A frame-sampling strategy.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// `count` frames spread uniformly over the whole video, first and last included.
    Uniform { count: usize },
    /// One frame every `1 / fps` seconds from the start, at most `max` frames (spread
    /// uniformly over the video when there would be more). Asking for more frames a
    /// second than the video has follows the [`ShortVideo`] policy.
    Fps { fps: f64, max: usize },
    /// The frames shown at these times (seconds from the first frame), returned in
    /// time order whatever the order asked; a time asked twice gives its frame twice.
    /// [`decode`](super::decode) looks the times up in the frames' timestamps (exact
    /// on variable-rate video); [`Sampling::indices`] alone has only the average
    /// frame rate (exact for constant-rate video).
    Timestamps(Vec<f64>),
}

/// Most frames one request may sample (an hour at 30 fps is 108,000): a larger count
/// is refused rather than allocated.
pub const MAX_SAMPLED_FRAMES: usize = 1 << 20;

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
        let asked = match self {
            Sampling::Uniform { count } => *count,
            Sampling::Fps { max, .. } => *max,
            Sampling::Timestamps(times) => times.len(),
        };
        if asked > MAX_SAMPLED_FRAMES {
            return Err(DataError::Sampling(format!(
                "{asked} frames asked for; at most {MAX_SAMPLED_FRAMES} are sampled from one video"
            )));
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
                let at_rate = || -> Vec<usize> {
                    (0..wanted)
                        .map(|i| ((i as f64 / every * fps).round() as usize).min(frames - 1))
                        .collect()
                };
                let count = wanted.min(*max);
                match short {
                    // More samples than the video has frames (faster than its frame
                    // rate, or a `max` past its length): the short-video policy.
                    ShortVideo::Truncate if count > frames => (0..frames).collect(),
                    ShortVideo::Error if count > frames => {
                        return Err(DataError::TooFewFrames {
                            asked: count,
                            available: frames,
                        });
                    }
                    _ if wanted > *max => uniform_indices(frames, *max),
                    _ => at_rate(),
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
        // Faster than the video's frames (60 a second from 30): the short-video policy.
        let fast = Sampling::Fps {
            fps: 60.0,
            max: 1000,
        };
        let repeated = fast.indices(300, 30.0, ShortVideo::Repeat).unwrap();
        assert_eq!(repeated.len(), 600);
        assert_eq!(&repeated[..5], &[0, 1, 1, 2, 2]);
        assert_eq!(
            fast.indices(300, 30.0, ShortVideo::Truncate).unwrap(),
            (0..300).collect::<Vec<_>>()
        );
        let err = fast.indices(300, 30.0, ShortVideo::Error).unwrap_err();
        assert!(matches!(
            err,
            DataError::TooFewFrames {
                asked: 600,
                available: 300
            }
        ));
        // Counts past the limit are refused before anything is allocated.
        for s in [
            Sampling::Uniform { count: usize::MAX },
            Sampling::Fps {
                fps: 1e6,
                max: usize::MAX,
            },
        ] {
            let err = s.indices(300, 30.0, ShortVideo::Repeat).unwrap_err();
            assert!(err.to_string().contains("at most 1048576"), "{err}");
        }
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
