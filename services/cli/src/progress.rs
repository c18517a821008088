//! Progress of long CLI work on stderr: a bar with count, rate and time left.
//!
//! On a terminal the bar redraws in place, at most ten times a second; in a
//! log (stderr not a terminal) a line is written at most every 5 s and at the
//! end, so a CI log or `2>file` stays readable. Nothing is drawn for work that
//! ends within the first redraw.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One piece of work of `total` steps, counted in `unit` ("customers").
#[derive(Debug)]
pub struct Progress {
    what: String,
    unit: &'static str,
    total: u64,
    started: Instant,
    terminal: bool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    done: u64,
    drawn_at: Option<Instant>,
    drawn: bool,
}

impl Progress {
    pub fn new(what: impl Into<String>, total: u64, unit: &'static str) -> Self {
        Self {
            what: what.into(),
            unit,
            total,
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            state: Mutex::new(State::default()),
        }
    }

    /// `done` steps are finished (absolute, not an increment).
    pub fn set(&self, done: u64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.done = done.min(self.total);
        let every = if self.terminal {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(5)
        };
        let now = Instant::now();
        let due = match state.drawn_at {
            Some(at) => now - at >= every,
            None => now - self.started >= every,
        };
        if due {
            state.drawn_at = Some(now);
            state.drawn = true;
            self.draw(state.done, now);
        }
    }

    /// Adds `steps` to what is done.
    pub fn add(&self, steps: u64) {
        let done = self.state.lock().unwrap_or_else(|p| p.into_inner()).done;
        self.set(done + steps);
    }

    /// Draws the final state (if anything was drawn) and ends the line.
    pub fn finish(&self) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.drawn {
            self.draw(state.done, Instant::now());
            if self.terminal {
                eprintln!();
            }
        }
    }

    fn draw(&self, done: u64, now: Instant) {
        let line = render(&self.what, self.unit, done, self.total, now - self.started);
        let mut stderr = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(stderr, "\r{line}\x1b[K");
        } else {
            let _ = writeln!(stderr, "{line}");
        }
        let _ = stderr.flush();
    }
}

/// `invoices [########------------] 812/2000 customers 406/s, 3 s left`
pub fn render(what: &str, unit: &str, done: u64, total: u64, elapsed: Duration) -> String {
    const WIDTH: u64 = 20;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH) as usize;
    let bar = format!(
        "{}{}",
        "#".repeat(filled),
        "-".repeat(WIDTH as usize - filled)
    );
    let seconds = elapsed.as_secs_f64();
    let rate = if seconds > 0.0 {
        done as f64 / seconds
    } else {
        0.0
    };
    let left = if done >= total {
        format!("done in {}", duration(seconds))
    } else if rate > 0.0 {
        format!("{} left", duration((total - done) as f64 / rate))
    } else {
        "time left unknown".to_owned()
    };
    format!("{what} [{bar}] {done}/{total} {unit} {rate:.0}/s, {left}")
}

fn duration(seconds: f64) -> String {
    let seconds = seconds.round() as u64;
    match seconds {
        0..60 => format!("{seconds} s"),
        60..3600 => format!("{} min {} s", seconds / 60, seconds % 60),
        _ => format!("{} h {} min", seconds / 3600, seconds % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_shows_count_rate_and_time_left() {
        let cases = [
            (
                ("invoices", "customers", 500, 2000, 2),
                "invoices [#####---------------] 500/2000 customers 250/s, 6 s left",
            ),
            (
                ("whatif", "customers", 3, 3, 75),
                "whatif [####################] 3/3 customers 0/s, done in 1 min 15 s",
            ),
            (
                ("load", "samples", 0, 10, 0),
                "load [--------------------] 0/10 samples 0/s, time left unknown",
            ),
            (
                ("load", "samples", 1, 7200, 1),
                "load [--------------------] 1/7200 samples 1/s, 1 h 59 min left",
            ),
            // Nothing to do is done.
            (
                ("x", "rows", 0, 0, 1),
                "x [####################] 0/0 rows 0/s, done in 1 s",
            ),
        ];
        for ((what, unit, done, total, seconds), expected) in cases {
            assert_eq!(
                render(what, unit, done, total, Duration::from_secs(seconds)),
                expected
            );
        }
    }
}
